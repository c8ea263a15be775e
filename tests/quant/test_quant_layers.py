"""FLoRA on quantized frozen bases (bitsandbytes 4/8-bit, torchao): forward and gradients against
the dequantized weight, merge / unmerge (bit for bit), merge_and_unload, train / save / load /
disable through fk.*. Each base skips when its package is missing."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from quant_common import BASES, IN, OUT, make_base, packed_copy, packed_equal, randomize_adapter_
from safetensors.torch import load_file
from torch import nn

import flora_kernels as fk
from flora_kernels.layers import FLoRALinear, FLoRAQuantLinear, QuantizedMergeWarning, layer_class_for
from flora_kernels.testing import SLACK, rel_err, tolerance
from flora_kernels.tucker import tucker_reconstruct

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _layer(name: str, rank=(5, 3), scale: float = 0.7) -> FLoRAQuantLinear:
    layer = FLoRAQuantLinear(make_base(name), rank=rank, scale=scale)
    randomize_adapter_(layer)
    return layer


def _reference(layer: FLoRAQuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x (dequantized W + s dW)^T + b in float64."""
    core, factors = layer.tensors("default")
    w = layer.base_weight().double() + tucker_reconstruct(core.double(), [f.double() for f in factors],
                                                         layer.flora_settings["default"].scale)
    b = layer.base_layer.bias
    return F.linear(x.double(), w, None if b is None else b.double())


def _base_error(layer: FLoRAQuantLinear, x: torch.Tensor) -> float:
    """The quantized module's own error against its dequantized weight (float64)."""
    with torch.no_grad():
        b = layer.base_layer.bias
        return rel_err(layer.base_layer(x), F.linear(x.double(), layer.base_weight().double(),
                                                     None if b is None else b.double()))


def _reported_rounding(merge) -> float:
    """Run ``merge``; return the rounding error its QuantizedMergeWarning reports."""
    with pytest.warns(QuantizedMergeWarning, match=r"rounded it by [0-9.e+-]+ \(relative norm\)") as record:
        merge()
    return float(re.search(r"rounded it by ([0-9.e+-]+)", str(record[0].message)).group(1))


@pytest.mark.parametrize("base", list(BASES))
def test_injection_picks_the_quantized_layer(base):
    module = make_base(base)
    assert layer_class_for(module) is FLoRAQuantLinear
    assert FLoRAQuantLinear.weight_shape_of(module) == (OUT, IN)
    model = fk.inject_flora(nn.Sequential(module, nn.ReLU()), fk.FLoRAConfig(rank=4, target_modules="all-linear"))
    layer = model[0]
    assert isinstance(layer, FLoRAQuantLinear) and tuple(layer.weight_modes().shape) == (OUT, IN)
    assert "adapters: factorized on reference" in repr(layer)
    assert layer.plan().backend == "reference"
    assert not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("base", list(BASES))
def test_output_and_gradients_match_the_dequantized_weight(base):
    layer = _layer(base)
    dtype = BASES[base][1]
    x = torch.randn(3, 7, IN, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (3, 7, OUT)
    ref = _reference(layer, x)
    bound = max(tolerance(dtype), SLACK * _base_error(layer, x))
    assert rel_err(y, ref) <= bound, (rel_err(y, ref), bound)
    dy = torch.randn_like(y)
    y.backward(dy)
    params = [layer.core, *layer.factors]
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    w = layer.base_weight().double() + tucker_reconstruct(p64[0], p64[1:], layer.flora_settings["default"].scale)
    F.linear(x64, w).backward(dy.double())
    for p, r in zip(params, p64):  # the adapter's gradients do not involve the quantized weight
        assert rel_err(p.grad, r.grad) <= tolerance(dtype), (rel_err(p.grad, r.grad), p.shape)
    # dx: the quantized module's own backward (on its dequantized weight) plus the adapter's
    assert rel_err(x.grad, x64.grad) <= bound, (rel_err(x.grad, x64.grad), bound)


@pytest.mark.parametrize("base", list(BASES))
def test_merge_requantizes_and_unmerge_restores_bit_for_bit(base):
    layer = _layer(base)
    dtype = BASES[base][1]
    x = torch.randn(4, IN, dtype=dtype)
    packed = packed_copy(layer)
    with torch.no_grad():
        y = layer(x)
    reported = _reported_rounding(layer.merge)
    assert layer.merged and not packed_equal(packed, packed_copy(layer))
    with torch.no_grad():
        y_merged = layer(x)
    # the merged output is off by about the reported rounding of W + dW, plus the base's own error
    assert rel_err(y_merged, y) <= SLACK * (reported + _base_error(layer, x) + tolerance(dtype))
    layer.unmerge()
    assert not layer.merged and packed_equal(packed, packed_copy(layer))
    with torch.no_grad():
        assert torch.equal(layer(x), y)


@pytest.mark.parametrize("base", ["bnb-nf4", "bnb-int8", "torchao-int8wo"])
def test_merge_and_unload_gives_a_quantized_module(base):
    module = make_base(base)
    kind = type(module)
    weight_kind = type(module.weight)
    model = fk.inject_flora(nn.Sequential(module), fk.FLoRAConfig(rank=4))
    randomize_adapter_(model[0])
    x = torch.randn(4, IN)
    with torch.no_grad():
        y = model(x)
    plain = None

    def unload():
        nonlocal plain
        plain = fk.merge_and_unload(model)

    reported = _reported_rounding(unload)
    assert type(plain[0]) is kind and type(plain[0].weight) is weight_kind
    with torch.no_grad():
        assert rel_err(plain(x), y) <= SLACK * (reported + 0.15)


@pytest.mark.parametrize("base", ["bnb-nf4", "bnb-int8", "torchao-int8wo", "torchao-intx4"])
def test_train_save_load_disable(base, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(make_base(base), nn.Tanh(), nn.Linear(OUT, 3))
    packed = packed_copy(model[0])
    fk.inject_flora(model, fk.FLoRAConfig(rank=4, scale=2.0, dropout=0.1, target_modules=["0"], modules_to_save=["2"]))
    x, t = torch.randn(64, IN), torch.randint(0, 3, (64,))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert packed_equal(packed, packed_copy(model[0]))  # the quantized base never changes
    model.eval()
    with torch.no_grad():
        y = model(x)
        with fk.disable_adapter(model):
            y_base = model(x)
    fk.save_flora(model, tmp_path)
    saved = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert all(".flora_" in k or ".2." in k for k in saved), saved  # adapter (and the saved head) only
    # a fresh model around the same quantized module (the frozen base), a new head (loaded from the file)
    fresh = nn.Sequential(model[0].base_layer, nn.Tanh(), nn.Linear(OUT, 3))
    fk.load_flora(fresh, tmp_path)
    fresh.eval()
    assert isinstance(fresh[0], FLoRAQuantLinear)
    with torch.no_grad():
        assert torch.allclose(fresh(x), y, atol=1e-5, rtol=1e-4)
        with fk.disable_adapter(fresh):
            assert torch.allclose(fresh(x), y_base, atol=1e-5, rtol=1e-4)


def test_adapter_trained_on_a_4bit_base_loads_into_the_full_precision_model(tmp_path):
    torch.manual_seed(0)
    full = nn.Sequential(nn.Linear(IN, OUT))
    quant = nn.Sequential(BASES["bnb-nf4"][0](full[0]))
    fk.inject_flora(quant, fk.FLoRAConfig(rank=4))
    randomize_adapter_(quant[0])
    fk.save_flora(quant, tmp_path)
    fk.load_flora(full, tmp_path)
    assert type(full[0]) is FLoRALinear
    x = torch.randn(5, IN)
    with torch.no_grad():
        delta = quant[0](x) - quant[0].base_layer(x)
        assert torch.allclose(full[0](x) - full[0].base_layer(x), delta, atol=1e-5)


def test_unquantized_int8_module_is_refused():
    bnb = pytest.importorskip("bitsandbytes")
    module = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=True)
    with pytest.raises(ValueError, match="expected int8 weights"):
        FLoRAQuantLinear(module)


def test_quantized_layer_refuses_other_strategies_and_backends():
    module = make_base("bnb-nf4")
    with pytest.raises(ValueError, match="strategy: expected one of"):
        FLoRAQuantLinear(module, strategy="merged")
    with pytest.raises(fk.BackendUnavailable, match="reference"):
        FLoRAQuantLinear(module, backend="cpp")


def test_eval_forward_repacking_keeps_dequantization_exact():
    """On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit for its inference kernel on an
    eval, no-grad forward; the dequantized weight stays that of the original packing."""
    layer = _layer("bnb-nf4")
    w = layer.base_weight()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, IN))
    # bf16 statistics after repacking: equal up to bf16 rounding of the block absmax
    assert rel_err(layer.base_weight(), w) <= tolerance(torch.bfloat16)


def test_unquantized_4bit_module_is_refused():
    bnb = pytest.importorskip("bitsandbytes")
    module = bnb.nn.Linear4bit(IN, OUT, quant_type="nf4")  # never moved to a device: not quantized yet
    with pytest.raises(ValueError, match="expected a quantized weight"):
        FLoRAQuantLinear(module)


class _OtherTorchaoWeight(nn.Parameter):
    """Stands for a torchao tensor type without a known requantization."""

    def dequantize(self):
        return self.data.clone()


_OtherTorchaoWeight.__module__ = "torchao.quantization.other"


def test_merge_refuses_an_unknown_torchao_type_and_leaves_the_layer_unchanged():
    module = nn.Linear(IN, OUT)
    module.weight = _OtherTorchaoWeight(module.weight.detach().clone(), requires_grad=False)
    layer = FLoRAQuantLinear(module, rank=3)
    randomize_adapter_(layer)
    weight = module.weight
    x = torch.randn(2, IN)
    with torch.no_grad():
        y = layer(x)
    with pytest.raises(ValueError, match="requantizing a torchao _OtherTorchaoWeight weight is not supported.*unmerged"):
        layer.merge()
    assert not layer.merged and layer.base_layer.weight is weight and layer._merge_saved is None
    with torch.no_grad():
        assert torch.equal(layer(x), y)


@pytest.mark.parametrize("base", ["bnb-nf4", "bnb-int8", "torchao-int8wo"])
def test_rank_one_without_bias_and_two_adapters(base):
    layer = FLoRAQuantLinear(make_base(base, bias=False), rank=1, scale=1.5)
    layer.add_adapter("second", rank=(3, 2), scale=0.5)
    randomize_adapter_(layer)
    x = torch.randn(5, IN)
    with torch.no_grad():
        y = layer(x)
        w = layer.base_weight().double()
        for a in ("default", "second"):
            core, factors = layer.tensors(a)
            w = w + tucker_reconstruct(core.double(), [f.double() for f in factors], layer.flora_settings[a].scale)
        assert rel_err(y, F.linear(x.double(), w)) <= max(tolerance(torch.float32), SLACK * _base_error(layer, x))

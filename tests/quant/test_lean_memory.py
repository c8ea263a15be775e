"""FLoRAConfig(lean_memory=True): the input factor stays frozen (one rule, kept by set_adapter,
add_adapter, PEFT), the layer input is not saved for backward, and the trained tensors get
the default path's gradients."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import flora_kernels as fk
from flora_kernels.layers import FLoRALayer, flora_layers
from flora_kernels.testing import rel_err, tolerance


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 16))


def _trains(layer: FLoRALayer, name: str) -> list[bool]:
    return [p.requires_grad for p in layer._tensors_of(name)]


def test_config_validates_lean_memory():
    with pytest.raises(ValueError, match="lean_memory: expected a bool"):
        fk.FLoRAConfig(lean_memory="yes")
    assert fk.FLoRAConfig.from_dict(fk.FLoRAConfig(lean_memory=True).to_dict()).lean_memory


def test_input_factor_frozen_through_set_adapter_and_add_adapter():
    model = fk.inject_flora(_model(), fk.FLoRAConfig(rank=4, lean_memory=True))
    layer = model[0]
    assert _trains(layer, "default") == [True, True, False]  # core, U_out train; U_in frozen
    fk.add_adapter(model, "full", fk.FLoRAConfig(rank=4))
    fk.set_adapter(model, "full")
    assert _trains(layer, "full") == [True, True, True] and _trains(layer, "default") == [False] * 3
    fk.set_adapter(model, ["default", "full"])
    assert _trains(layer, "default") == [True, True, False] and _trains(layer, "full") == [True] * 3
    layer.set_lean_memory(False, "default")
    assert _trains(layer, "default") == [True, True, True]
    layer.set_lean_memory(True, "default")
    assert layer.flora_settings["default"].lean_memory and "lean_memory" in repr(layer)
    assert layer.trainable_tensors("default") == [layer.flora_core["default"], layer.flora_u0["default"]]
    with pytest.raises(TypeError, match="lean_memory: expected a bool"):
        layer.set_lean_memory(1, "default")


@pytest.mark.parametrize("make", [lambda: nn.ConvTranspose2d(6, 4, 3), lambda: nn.Conv2d(6, 4, 3)],
                         ids=["convT2d", "conv2d"])
def test_input_mode_of_conv_layers(make):
    model = fk.inject_flora(nn.Sequential(make()), fk.FLoRAConfig(rank=2, lean_memory=True))
    layer = model[0]
    frozen = [n for n, t in enumerate(layer.factors) if not t.requires_grad]
    assert frozen == [layer.input_mode] and layer.core.requires_grad


def _saved_storages(fn) -> set[int]:
    seen = set()

    def pack(t):
        seen.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


@pytest.mark.parametrize("lean", [False, True])
def test_layer_input_saved_only_without_lean(lean):
    torch.manual_seed(0)
    layer = fk.FLoRALinear(nn.Linear(24, 40), rank=4, lean_memory=lean)  # freezes the base (and U_in if lean)
    assert layer.flora_u1["default"].requires_grad == (not lean)
    x = torch.randn(7, 24, requires_grad=True)
    saved = _saved_storages(lambda: layer(x))
    assert (x.untyped_storage().data_ptr() in saved) == (not lean)


def test_lean_gradients_equal_the_default_path():
    torch.manual_seed(0)
    full = fk.inject_flora(_model(), fk.FLoRAConfig(rank=(3, 5), scale=0.5, dropout=0.0))
    lean = fk.inject_flora(_model(), fk.FLoRAConfig(rank=(3, 5), scale=0.5, lean_memory=True))
    lean.load_state_dict(full.state_dict())
    with torch.no_grad():
        for _, layer in flora_layers(full):
            layer.core.normal_()
        lean.load_state_dict(full.state_dict())
    x = torch.randn(2, 9, 24, requires_grad=True)
    xl = x.detach().clone().requires_grad_()
    full(x).square().mean().backward()
    lean(xl).square().mean().backward()
    assert rel_err(xl.grad, x.grad) <= tolerance(torch.float32)
    named = dict(full.named_parameters())
    trained = [(n, p) for n, p in lean.named_parameters() if p.requires_grad]
    assert len(trained) == 4  # core and U_out of both layers
    for n, p in trained:
        assert rel_err(p.grad, named[n].grad) <= tolerance(torch.float32), n


def test_lean_memory_is_saved_and_loaded(tmp_path):
    model = fk.inject_flora(_model(), fk.FLoRAConfig(rank=4, lean_memory=True))
    fk.save_flora(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lean_memory"] is True
    fresh = fk.load_flora(_model(), tmp_path)
    assert all(layer.flora_settings["default"].lean_memory for _, layer in flora_layers(fresh))
    assert not fresh[0].flora_u1["default"].requires_grad


def test_lean_memory_through_peft():
    pytest.importorskip("peft")
    from peft import get_peft_model

    import flora_kernels.peft  # noqa: F401
    from flora_kernels.peft import FloraConfig

    model = get_peft_model(_model(), FloraConfig(r=4, target_modules=["0", "2"], lean_memory=True))
    layer = model.base_model.model[0]
    assert _trains(layer, "default") == [True, True, False]
    model.add_adapter("other", FloraConfig(r=4, target_modules=["0"]))
    model.set_adapter("other")
    model.set_adapter("default")
    assert _trains(layer, "default") == [True, True, False] and _trains(layer, "other") == [False] * 3


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_quantized_layer_lean_does_not_save_the_input():
    from quant_common import IN, make_base

    model = fk.inject_flora(nn.Sequential(make_base("bnb-nf4")), fk.FLoRAConfig(rank=4, lean_memory=True))
    x = torch.randn(5, IN, requires_grad=True)
    assert x.untyped_storage().data_ptr() not in _saved_storages(lambda: model(x))


def _bench_module():
    import importlib.util
    import os
    import sys

    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "lean_memory.py")
    spec = importlib.util.spec_from_file_location("lean_memory_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_saved_bytes_of_a_lean_mlp_stay_near_the_frozen_model():
    """bench/lean_memory.py's measure on pre-norm MLP blocks: lean <= 1.15x frozen, the default
    (which keeps every Linear's input) well above."""
    bench = _bench_module()
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) for _ in range(3)]
    frozen = nn.Sequential(*blocks)
    for p in frozen.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 64, 64, requires_grad=True)
    ratios = {}
    for lean in (False, True):
        model = fk.inject_flora(copy.deepcopy(frozen), fk.FLoRAConfig(rank=8, lean_memory=lean))
        ratios[lean] = bench.saved_storage_bytes(lambda m=model: m(x), [*model.parameters(), x]) / (
            bench.saved_storage_bytes(lambda: frozen(x), [*frozen.parameters(), x])
        )
    assert ratios[True] <= 1.15 < ratios[False], ratios

"""Hot-swapping adapters into compiled models: ``fk.prepare_hotswap`` / ``fk.hotswap_adapter``
and PEFT's ``peft.utils.hotswap`` API for FLORA.

Every layer type: adapter A (one set of ranks and scale) is prepared to a larger rank (outputs
unchanged), the model is compiled (Dynamo, ``aot_eager``, fullgraph), adapter B (other ranks and
scale, saved with ``save_flora``) is swapped in: Dynamo compiles no new graph and the output
equals a fresh model with B loaded. Then back to A.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import flora_kernels as fk
from flora_kernels.layers import flora_layers

ATOL = RTOL = 1e-5


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def conv1d_hf() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    return nn.Sequential(transformers.pytorch_utils.Conv1D(8, 6), nn.Tanh())


# name -> (model factory, input factory, target_modules)
CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)), lambda: torch.randn(3, 6), None),
    "conv1d_hf": (conv1d_hf, lambda: torch.randn(3, 6), None),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 5, 3, padding=1)), lambda: torch.randn(2, 3, 9), None),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 5, 3, stride=2), nn.Conv2d(5, 4, 1)), lambda: torch.randn(2, 3, 8, 8),
               None),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 5, (2, 3, 3))), lambda: torch.randn(1, 2, 4, 5, 5), None),
    "convtranspose2d": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 5, 3, stride=2)), lambda: torch.randn(2, 3, 5, 5),
                        None),
    "embedding": (lambda: nn.Sequential(nn.Embedding(20, 6, padding_idx=0)), lambda: torch.randint(0, 20, (2, 5)),
                  ["0"]),
    "mha": (Attention, lambda: torch.randn(2, 4, 8), ["attn", "out_proj"]),
}


@torch.no_grad()
def randomize(model: nn.Module) -> None:
    for _, layer in flora_layers(model):
        for name in layer.adapter_names:
            core, factors = layer.tensors(name)
            core.normal_(0.0, 0.5)
            for f in factors:
                f.normal_(0.0, 0.5)


def adapted(base: nn.Module, targets, rank, kernel_rank, scale: float) -> nn.Module:
    cfg = fk.FLoRAConfig(rank=rank, kernel_rank=kernel_rank, scale=scale, target_modules=targets, backend="reference")
    model = fk.inject_flora(copy.deepcopy(base), cfg)
    randomize(model)
    return model.eval()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("case", list(CASES))
def test_hotswap_compiled_no_recompile(case, tmp_path):
    make, make_x, targets = CASES[case]
    torch.manual_seed(0)
    base, x = make().eval(), make_x()
    a = adapted(base, targets, rank=(2, 1), kernel_rank=1, scale=0.5)
    b = adapted(base, targets, rank=3, kernel_rank=None, scale=1.7)
    fk.save_flora(a, tmp_path / "a")
    fk.save_flora(b, tmp_path / "b")
    with torch.no_grad():
        y_a, y_b = a(x), fk.load_flora(copy.deepcopy(base), tmp_path / "b").eval()(x)  # b loaded fresh
        fk.prepare_hotswap(a, target_rank=4)
        torch.testing.assert_close(a(x), y_a, atol=ATOL, rtol=RTOL)  # zero padding: same function
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(a, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), y_a, atol=ATOL, rtol=RTOL)
        before = graphs()
        assert before >= 1
        fk.hotswap_adapter(compiled, tmp_path / "b")
        torch.testing.assert_close(compiled(x), y_b, atol=ATOL, rtol=RTOL)
        fk.hotswap_adapter(compiled, tmp_path / "a")
        torch.testing.assert_close(compiled(x), y_a, atol=ATOL, rtol=RTOL)
        assert graphs() == before, "hotswap recompiled"
    for _, layer in flora_layers(a):
        if layer.adapter_names:
            assert float(layer.scale_tensor("default")) == layer.scale == 0.5


def test_hotswap_checks_before_changing(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).eval()
    a = adapted(base, None, rank=2, kernel_rank=None, scale=0.5)
    big = adapted(base, None, rank=5, kernel_rank=None, scale=1.0)
    other = adapted(base, ["0"], rank=2, kernel_rank=None, scale=1.0)
    fk.prepare_hotswap(a, target_rank=3)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    with pytest.raises(ValueError, match=r"rank 5 of mode 0 exceeds the 3 this layer holds.*prepare_hotswap"):
        fk.hotswap_adapter(a, fk.model.adapter_state(big, "default"))
    with pytest.raises(ValueError, match=r"targets differ.*lacks \['2'\] and adds \[\]"):
        fk.hotswap_adapter(a, fk.model.adapter_state(other, "default"))
    with pytest.raises(KeyError, match="no adapter 'other'"):
        fk.hotswap_adapter(a, fk.model.adapter_state(other, "default"), adapter_name="other")
    bad = dict(fk.model.adapter_state(other, "default"))
    bad["base_model.model.0.flora_u1"] = torch.zeros(5, 2)
    with pytest.raises(ValueError, match=r"0.flora_u1: expected shape \(6, 2\)"):
        fk.hotswap_adapter(other, bad)
    with pytest.raises(ValueError, match="prepare_hotswap: adapter 'default' has ranks"):
        fk.prepare_hotswap(a, target_rank=2)
    with pytest.raises(ValueError, match="before torch.compile"):
        fk.prepare_hotswap(torch.compile(a), target_rank=3)
    fk.merge_flora(a)
    with pytest.raises(ValueError, match="merged"):
        fk.hotswap_adapter(a, fk.model.adapter_state(a, "default"))
    fk.unmerge_flora(a)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, state[k], atol=1e-6, rtol=0)


def test_hotswap_unprepared_same_or_smaller_rank_and_scale_tensor():
    """Without prepare: a smaller adapter is zero-padded into the existing tensors (exact); the
    state dict form takes layer_info's scales; set_adapter_scale writes a held scale tensor."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).eval()
    a = adapted(base, None, rank=3, kernel_rank=None, scale=0.5)
    b = adapted(base, None, rank=2, kernel_rank=None, scale=2.0)
    x = torch.randn(3, 6)
    info = fk.model.adapter_layer_info(b, "default")
    state = {k: v for k, v in b.state_dict().items() if ".flora_" in k}  # keys <m>.flora_core.default
    fk.hotswap_adapter(a, state, layer_info=info)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=ATOL, rtol=RTOL)
    assert dict(flora_layers(a))["0"].ranks == (3, 3)
    fk.prepare_hotswap(a)
    fk.set_adapter_scale(a, 0.25)
    fk.set_adapter_scale(b, 0.25)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=ATOL, rtol=RTOL)
    assert float(dict(flora_layers(a))["2"].scale_tensor("default")) == 0.25


# ----------------------------------------------------------------------------- PEFT's API


def test_peft_hotswap_api_for_flora(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel, get_peft_model
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    import flora_kernels.peft  # noqa: F401  (registers FLORA and its hotswap hooks)
    from flora_kernels.peft import FloraConfig

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(5 * 36, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    outs = {}
    for name, (r, scale) in {"a": (2, 0.5), "b": (3, 1.5)}.items():
        pm = get_peft_model(copy.deepcopy(base), FloraConfig(r=r, kernel_r=2, scale=scale, backend="reference"))
        randomize(pm)
        pm.save_pretrained(str(tmp_path / name))
        with torch.no_grad():
            outs[name] = pm(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=4, config=model.peft_config)
    assert dict(flora_layers(model))["base_model.model.0"].ranks == (4, 3, 3, 3)  # r_in clamped to 3 channels
    with torch.no_grad():
        model(x)  # backends loaded before tracing
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), outs["a"], atol=ATOL, rtol=RTOL)
        before = graphs()
        hotswap_adapter(compiled, str(tmp_path / "b"), adapter_name="default", torch_device="cpu")
        torch.testing.assert_close(compiled(x), outs["b"], atol=ATOL, rtol=RTOL)
        assert graphs() == before
    model.save_pretrained(str(tmp_path / "swapped"))  # the padded ranks are recorded: it loads back
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        again = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "swapped")).eval()
        torch.testing.assert_close(again(x), outs["b"], atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="Configs are incompatible: for flora_dropout"):
        pm = get_peft_model(copy.deepcopy(base), FloraConfig(r=2, flora_dropout=0.1))
        pm.save_pretrained(str(tmp_path / "c"))
        hotswap_adapter(compiled, str(tmp_path / "c"), adapter_name="default", torch_device="cpu")


def test_prepare_announces_each_change_once_and_hotswap_none(monkeypatch, tmp_path):
    """Layers cache prepared calls keyed on ``FLoRALayer._changed``: prepare is one event per
    layer; a hotswap writes values only (tensors in place, held scales), so it needs none (an
    event would make a compiled model recompile)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).eval()
    a = adapted(base, None, rank=2, kernel_rank=None, scale=0.5)
    b = adapted(base, None, rank=3, kernel_rank=None, scale=1.5)
    events: list[int] = []
    monkeypatch.setattr(fk.FLoRALayer, "_changed", lambda self: events.append(id(self)))
    layers = [id(layer) for _, layer in flora_layers(a)]
    fk.prepare_hotswap(a, target_rank=4)
    assert sorted(events) == sorted(layers)
    events.clear()
    fk.hotswap_adapter(a, fk.model.adapter_state(b, "default"))  # tensors only
    assert events == []
    fk.hotswap_adapter(a, fk.model.adapter_state(b, "default"), layer_info=fk.model.adapter_layer_info(b, "default"))
    assert events == []


@pytest.mark.skipif(not os.environ.get("FLORA_TEST_INDUCTOR"), reason="inductor compiles for minutes on CPU; FLORA_TEST_INDUCTOR=1")
@pytest.mark.parametrize("case", ["linear", "mha"])
def test_hotswap_inductor_no_recompile(case, tmp_path):
    make, make_x, targets = CASES[case]
    torch.manual_seed(0)
    base, x = make().eval(), make_x()
    a = adapted(base, targets, rank=2, kernel_rank=None, scale=0.5)
    b = adapted(base, targets, rank=3, kernel_rank=None, scale=1.7)
    fk.save_flora(b, tmp_path / "b")
    with torch.no_grad():
        y_b = b(x)
        fk.prepare_hotswap(a, target_rank=4)
        a(x)
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(a)
        compiled(x)
        before = graphs()
        fk.hotswap_adapter(compiled, tmp_path / "b")
        torch.testing.assert_close(compiled(x), y_b, atol=ATOL, rtol=RTOL)
        assert graphs() == before


def test_peft_hotswap_api_still_serves_lora(tmp_path):
    """The wrapped peft.utils.hotswap helpers hand LoRA models to PEFT's own code."""
    pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    import flora_kernels.peft  # noqa: F401

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).eval()
    x = torch.randn(3, 6)
    outs = {}
    for name, (r, alpha) in {"a": (2, 1.0), "b": (3, 4.0)}.items():
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=["0", "2"],
                                                             init_lora_weights=False))
        pm.save_pretrained(str(tmp_path / name))
        with torch.no_grad():
            outs[name] = pm(x)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=4)
    assert model.base_model.model[0].lora_A["default"].weight.shape == (4, 6)
    hotswap_adapter(model, str(tmp_path / "b"), adapter_name="default", torch_device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(x), outs["b"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", list(CASES))
def test_held_scale_matches_float_scale_with_gradients(case):
    """A prepared layer (scale as a tensor multiplied into the core) computes the same output and
    the same gradients (input and every adapter tensor) as with the float scale."""
    make, make_x, targets = CASES[case]
    torch.manual_seed(0)
    plain = adapted(make(), targets, rank=(2, 3), kernel_rank=2, scale=0.7).train()
    held = copy.deepcopy(plain)
    fk.prepare_hotswap(held)
    x = make_x()
    grads = []
    for model in (plain, held):
        xi = x.clone().requires_grad_(x.is_floating_point())
        y = model(xi)
        y.square().sum().backward()
        tensors = [p for _, layer in flora_layers(model) for a in layer.adapter_names for p in layer._tensors_of(a)]
        grads.append((y.detach(), xi.grad, [p.grad for p in tensors]))
    (y0, gx0, gp0), (y1, gx1, gp1) = grads
    torch.testing.assert_close(y1, y0, atol=ATOL, rtol=RTOL)
    if gx0 is not None:
        torch.testing.assert_close(gx1, gx0, atol=ATOL, rtol=RTOL)
    assert len(gp0) == len(gp1) > 0
    for g1, g0 in zip(gp1, gp0):
        torch.testing.assert_close(g1, g0, atol=ATOL, rtol=RTOL)

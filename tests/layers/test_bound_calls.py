"""Bound calls (FLoRALayer.forward per input signature): every change event takes effect on the
next forward, the steady path validates and dispatches nothing, torch.compile traces the bound
path without graph breaks and recompiles after a change."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_rel_close, randomize_
from torch import nn

import flora_kernels as fk
from flora_kernels import functional
from flora_kernels.backends import autotune
from flora_kernels.backends.base import Call
from flora_kernels.layers import flora_layers

KINDS = ["linear", "conv2d"]


def _layer(kind: str, **kw):
    """(randomized layer, input)."""
    if kind == "linear":
        layer = fk.FLoRALinear(nn.Linear(7, 5), rank=3, scale=0.5, **kw)
        x = torch.randn(2, 3, 7)
    elif kind == "conv2d":
        layer = fk.FLoRAConv2d(nn.Conv2d(4, 6, 3, padding=1), rank=2, scale=0.5, **kw)
        x = torch.randn(2, 4, 5, 5)
    elif kind == "convtranspose2d":
        layer = fk.layers.FLoRAConvTranspose2d(nn.ConvTranspose2d(4, 6, 3, stride=2), rank=2, scale=0.5, **kw)
        x = torch.randn(2, 4, 5, 5)
    else:
        layer = fk.layers.FLoRAEmbedding(nn.Embedding(11, 6), rank=2, scale=0.5, **kw)
        x = torch.randint(0, 11, (2, 5))
    return randomize_(layer), x


def _fresh(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a layer with no bound op computes for x (a copy binds anew)."""
    return copy.deepcopy(layer)(x)


def _oracle(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """base op with the effective weight (base weight + the live adapters' deltas), computed afresh."""
    base, w = layer.base_layer, layer.effective_weight()
    if isinstance(base, nn.Linear):
        return nn.functional.linear(x, w, base.bias)
    return base._conv_forward(x, w, base.bias)


def _bound_then(layer, x, event) -> tuple[torch.Tensor, torch.Tensor]:
    """(output before the event, output after it), the layer's op bound for x before the event."""
    with torch.no_grad():
        before = layer(x)
        layer(x)
        assert layer._bound.ops, "the forward did not bind"
        event(layer)
        return before, layer(x)


def _randomize_named(layer, name):
    core, factors = layer.tensors(name)
    with torch.no_grad():
        for t in (core, *factors):
            t.normal_()


def _add_second(layer):
    layer.add_adapter("second", rank=2, scale=2.0)
    _randomize_named(layer, "second")


def _load_other(layer):
    other = randomize_(copy.deepcopy(layer))
    layer.load_state_dict(other.state_dict())


def _load_assign(layer):
    other = randomize_(copy.deepcopy(layer))
    layer.load_state_dict(other.state_dict(), assign=True)


def _replace_weight(layer):
    layer.base_layer.weight = nn.Parameter(torch.randn_like(layer.base_layer.weight), requires_grad=False)


def _replace_bias(layer):
    layer.base_layer.bias = nn.Parameter(torch.randn_like(layer.base_layer.bias), requires_grad=False)


def _replace_core(layer):  # as code that moves adapters by replacing their parameters does
    layer.flora_core["default"] = nn.Parameter(torch.randn_like(layer.core))
    for n, f in enumerate(layer.factors):
        getattr(layer, f"flora_u{n}")["default"] = nn.Parameter(torch.randn_like(f))


EVENTS = {
    "set_scale": lambda m: m.set_scale(3.0),
    "scale_property": lambda m: setattr(m, "scale", -1.0),
    "add_adapter": _add_second,
    "set_adapter_other": lambda m: (_add_second(m), m.set_adapter("second")),
    "set_adapter_both": lambda m: (_add_second(m), m.set_adapter(["default", "second"])),
    "delete_adapter": lambda m: (_add_second(m), m.set_adapter(["default", "second"]), m.delete_adapter("default")),
    "merge": lambda m: m.merge(),
    "merge_unmerge_rescale": lambda m: (m.merge(), m.unmerge(), m.set_scale(2.0)),
    "disable": lambda m: m.enable_adapters(False),
    "disable_enable_rescale": lambda m: (m.enable_adapters(False), m.enable_adapters(True), m.set_scale(2.0)),
    "load_state_dict": _load_other,
    "load_state_dict_assign": _load_assign,
    "optimizer_like_update": lambda m: m.core.add_(1.0),
    "replaced_weight": _replace_weight,
    "replaced_bias": _replace_bias,
    "replaced_adapter_tensors": _replace_core,
    "strategy": lambda m: setattr(m, "strategy", "merged"),
}


@pytest.mark.parametrize("event", list(EVENTS))
@pytest.mark.parametrize("kind", KINDS)
def test_event_takes_effect(kind, event):
    layer, x = _layer(kind, **({"strategy": "factorized", "backend": "reference"} if event == "strategy" else {}))
    before, after = _bound_then(layer, x, EVENTS[event])
    with torch.no_grad():
        want = _fresh(layer, x)
    assert_rel_close(after, want, 1e-5, msg=f"after {event}")
    if event == "strategy":  # the same function by another computation: only the rounding differs
        assert not torch.equal(after, before), "the strategy change did not take effect"
    elif event != "merge":  # merging keeps the function
        assert not torch.allclose(after, before), f"{event} did not change the function: the check cannot fail"


OTHER_EVENTS = ["set_scale", "add_adapter", "delete_adapter", "merge_unmerge_rescale", "disable", "load_state_dict",
                "replaced_weight"]


@pytest.mark.parametrize("event", OTHER_EVENTS)
@pytest.mark.parametrize("kind", ["convtranspose2d", "embedding"])
def test_event_takes_effect_other_types(kind, event):
    """ConvTranspose and Embedding bind their forward too (their fused op reads its state per call)."""
    layer, x = _layer(kind)
    before, after = _bound_then(layer, x, EVENTS[event])
    with torch.no_grad():
        assert_rel_close(after, _fresh(layer, x), 1e-5, msg=f"after {event}")
    assert not torch.allclose(after, before), f"{event} did not change the function: the check cannot fail"


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_and_device_moves(kind):
    layer, x = _layer(kind)
    with torch.no_grad():
        layer(x)
        layer.double()
        y = layer(x.double())
        assert y.dtype == torch.float64
        assert_rel_close(y, _fresh(layer, x.double()), 1e-12)
        layer.float()  # and back: new tensors again
        y32 = layer(x)
        assert y32.dtype == torch.float32
        assert_rel_close(y32, _fresh(layer, x), 1e-5)
        assert_rel_close(y32, y, 1e-5)


@pytest.mark.parametrize("how", ["hook", "parametrization"])
@pytest.mark.parametrize("kind", KINDS)
def test_weight_norm_after_binding(kind, how):
    """Weight norm added after binding: the weight is recomputed per call from its sources."""
    layer, x = _layer(kind)
    with torch.no_grad():
        layer(x)
    if how == "hook":
        torch.nn.utils.weight_norm(layer.base_layer)
        g = layer.base_layer.weight_g
    else:
        torch.nn.utils.parametrizations.weight_norm(layer.base_layer)
        g = layer.base_layer.parametrizations.weight.original0
    with torch.no_grad():
        y = layer(x)
        assert_rel_close(y, _oracle(layer, x), 1e-5)
        g.mul_(2.0)
        y2 = layer(x)
        assert_rel_close(y2, _oracle(layer, x), 1e-5)
    assert not torch.allclose(y, y2)


@pytest.mark.parametrize("kind", KINDS)
def test_train_eval_grad_modes_and_dropout(kind):
    layer, x = _layer(kind, dropout=0.5)
    layer.train()
    with torch.no_grad():
        a, b = layer(x), layer(x)
    assert not torch.allclose(a, b), "train mode with dropout resamples"
    layer.eval()
    with torch.no_grad():
        y_nograd = layer(x)
    y_grad = layer(x)
    assert y_grad.requires_grad and not y_nograd.requires_grad
    assert_rel_close(y_grad, y_nograd, 1e-5)  # (grad mode may dispatch to another backend)
    layer.dropout = 0.0  # a dropout change in train mode: deterministic again
    layer.train()
    with torch.no_grad():
        assert_rel_close(layer(x), y_nograd, 1e-5)
    layer.dropout = 0.25
    torch.manual_seed(3)
    with torch.no_grad():
        y = layer(x)
    torch.manual_seed(3)
    with torch.no_grad():
        assert torch.equal(y, _fresh(layer, x))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_through_the_bound_op(kind):
    layer, x = _layer(kind)
    x = x.requires_grad_(True)
    layer(x)  # bind
    y = layer(x)
    fresh = copy.deepcopy(layer)
    xf = x.detach().clone().requires_grad_(True)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, layer.core, *layer.factors], dy)
    want = torch.autograd.grad(fresh(xf), [xf, fresh.core, *fresh.factors], dy)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_rel_close(g, w, 1e-5, msg=f"grad {i}")


@pytest.mark.parametrize("kind", KINDS)
def test_autocast(kind):
    layer, x = _layer(kind)
    with torch.no_grad():
        y32 = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            want = _fresh(layer, x)
    assert y.dtype == want.dtype == torch.bfloat16
    assert torch.equal(y, want)
    assert_rel_close(y.float(), y32, 5e-2)


def test_merged_guard_still_raises_in_training():
    layer, x = _layer("linear")
    layer.train()
    layer(x)
    layer.merge()
    with pytest.raises(RuntimeError, match="backward through a merged FLoRA layer"):
        layer(x).sum().backward()
    layer.unmerge()
    layer(x).sum().backward()
    assert layer.core.grad is not None


@pytest.mark.parametrize("kind", KINDS)
def test_steady_path_validates_and_dispatches_nothing(kind, monkeypatch):
    layer, x = _layer(kind)
    with torch.no_grad():
        want = layer(x)

    def boom(*a, **k):
        raise AssertionError("called on the steady path")

    monkeypatch.setattr(Call, "describe", boom)
    for name in ("_check_tensors", "_check_adapter", "resolve"):
        monkeypatch.setattr(functional, name, boom)
    monkeypatch.setattr(autotune, "resolve", boom)
    monkeypatch.setattr(type(layer), "tensors", boom)
    with torch.no_grad():
        assert torch.equal(layer(x), want)
    with pytest.raises(AssertionError, match="steady path"), torch.no_grad():  # a new signature describes
        layer(x[:1])


def test_transformers_conv1d_bound():
    transformers = pytest.importorskip("transformers.pytorch_utils")
    base = transformers.Conv1D(6, 4)  # (in=4, out=6), weight stored (4, 6)
    layer = randomize_(fk.FLoRALinear(base, rank=2))
    x = torch.randn(3, 4)
    with torch.no_grad():
        layer(x)
        y = layer(x)
        want = base(x) + x @ layer.delta_weight().t()
    assert_rel_close(y, want, 1e-5)


def test_record_dispatch_sees_bound_layers():
    """record_dispatch after warm-up still notes every adapted layer's decision."""
    model = fk.inject_flora(_Net(), fk.FLoRAConfig(rank=2, target_modules=("conv", "fc")))
    x = torch.randn(2, 3, 5, 5)
    model(x)
    with fk.record_dispatch(model) as rep:
        model(x)
    assert set(rep) == {"conv", "fc"}
    model(x)  # and binds again afterwards
    assert all(layer._bound.ops for _, layer in flora_layers(model))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_compile_no_graph_break_and_change_events():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    model = fk.inject_flora(_Net(), fk.FLoRAConfig(rank=2, target_modules=("conv", "fc")))
    for _, layer in flora_layers(model):
        randomize_(layer)
    x = torch.randn(2, 3, 5, 5)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break raises
    y = compiled(x)
    y.sum().backward()
    assert_rel_close(y, model(x), 1e-5)
    graphs = counters["stats"]["unique_graphs"]
    compiled(x)
    assert counters["stats"]["unique_graphs"] == graphs, "a steady call recompiled"
    fk.set_adapter_scale(model, 3.0)
    y3 = compiled(x)
    assert_rel_close(y3, model(x), 1e-5)
    assert not torch.allclose(y3, y)
    torch._dynamo.reset()


@pytest.mark.skipif(fk.available_backends().get("cpp") != "ok", reason="cpp backend not built")
def test_compiled_forward_runs_the_decided_variant(monkeypatch):
    """The traced plan names the backend's variant, not only the backend: a compiled forward runs
    the variant the decision chose (here "two" of a cpp backend given two variants)."""
    from flora_kernels.backends.ext.cpp import CppBackend

    seen: list[str | None] = []
    real_linear = CppBackend.linear

    def linear(self, *args):
        seen.append(self.variant)
        return real_linear(self, *args)

    monkeypatch.setattr(CppBackend, "variants", lambda self, call: ("one", "two"))
    monkeypatch.setattr(CppBackend, "linear", linear)
    autotune.force_dispatch("cpp/factorized/two")
    try:
        layer = fk.FLoRALinear(nn.Linear(6, 5), rank=2)
        randomize_(layer)
        x = torch.randn(3, 6)
        y = layer(x)  # eager: the decision and its bound op
        assert seen == ["two"]
        torch._dynamo.reset()
        yc = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
        assert seen[1:] and set(seen[1:]) == {"two"}, seen
        assert_rel_close(yc, y, 1e-5)
    finally:
        autotune.force_dispatch(None)
        torch._dynamo.reset()

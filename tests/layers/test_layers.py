"""FLoRALinear / FLoRAConv1d/2d/3d: exactness at init, an einsum + torch-module oracle, fp64
gradcheck, dropout, merge/unmerge, the cost-model plan, half precision, constructor errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

import flora_kernels as fk
from flora_kernels.layers import wrap
from helpers import (
    CONV_CASES,
    CONV_IDS,
    TOL,
    assert_close,
    assert_rel_close,
    conv_size,
    einsum_reconstruct,
    make_conv,
    oracle_output,
    randomize_,
)

STRATS = ["factorized", "merged"]
REF = dict(backend="reference")

LINEAR_CASES = [("linear-7x5", 7, 5, 3), ("linear-rank1", 6, 9, 1), ("linear-rank-clamped", 4, 3, 8)]
ALL_CASES = [("linear", c) for c in LINEAR_CASES] + [("conv", c) for c in CONV_CASES]
ALL_IDS = [c[0] for c in LINEAR_CASES] + CONV_IDS
# a Linear, a grouped Conv2d with tuple geometry, a Conv3d
FEW = [ALL_CASES[ALL_IDS.index(i)] for i in ("linear-7x5", "2d-groups2-tuples", "3d-s121")]
FEW_IDS = ["linear-7x5", "2d-groups2-tuples", "3d-s121"]


def _build(kind: str, case, strategy: str, scale: float = 0.75, dropout: float = 0.0):
    """(base module, FLoRA layer around a deep copy of it, input)."""
    if kind == "linear":
        _, i, o, r = case
        base = nn.Linear(i, o)
        layer = fk.FLoRALinear(copy.deepcopy(base), rank=r, scale=scale, dropout=dropout, strategy=strategy, **REF)
        x = torch.randn(2, 3, i)
    else:
        base, rank, krank = make_conv(case)
        layer = wrap(copy.deepcopy(base), rank=rank, kernel_rank=krank, scale=scale, dropout=dropout,
                     strategy=strategy, **REF)
        x = torch.randn(2, base.in_channels, *([conv_size(case[1])] * case[1]))
    return base, layer, x


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("kind,case", ALL_CASES, ids=ALL_IDS)
def test_zero_init_equals_base_exactly(kind, case, strategy):
    base, layer, x = _build(kind, case, strategy)
    assert torch.equal(layer.core, torch.zeros_like(layer.core))
    with torch.no_grad():
        want = base(x)
        got = layer(x)
    assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item():.3e}"


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("kind,case", ALL_CASES, ids=ALL_IDS)
def test_random_adapter_matches_oracle(kind, case, strategy):
    """layer(x) == base(x) + op(x, dW), dW by einsum, op by a torch module clone (fp64 oracle)."""
    base, layer, x = _build(kind, case, strategy)
    randomize_(layer)
    with torch.no_grad():
        got = layer(x)
        want = oracle_output(base, x, layer.core, list(layer.factors), layer.scale)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_rel_close(got, want, 1e-5, msg=f"{strategy} vs oracle")


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("kind,case", FEW, ids=FEW_IDS)
def test_default_backend_matches_oracle(kind, case, strategy):
    """What a user gets with backend="auto" (the best available one here), forward and grads."""
    base, _, x = _build(kind, case, strategy)
    layer = randomize_(wrap(copy.deepcopy(base), rank=2, scale=0.75, strategy=strategy))
    x.requires_grad_(True)
    y = layer(x)
    want = oracle_output(base, x, layer.core, list(layer.factors), layer.scale)
    assert_rel_close(y, want, 1e-5, msg="auto backend vs oracle")
    ref_layer = wrap(copy.deepcopy(base), rank=2, scale=0.75, strategy=strategy, **REF)
    ref_layer.load_state_dict(layer.state_dict())
    xr = x.detach().clone().requires_grad_(True)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, layer.core, *layer.factors], dy)
    exp = torch.autograd.grad(ref_layer(xr), [xr, ref_layer.core, *ref_layer.factors], dy)
    for i, (a, b) in enumerate(zip(got, exp)):
        assert_rel_close(a, b, 1e-5, msg=f"grad {i}")


@pytest.mark.parametrize("strategy", STRATS)
def test_grouped_conv_explicit_oracle(strategy):
    """Grouped conv: the shared factors give a (C_out, C_in/groups, k, k) dW used by F.conv2d."""
    base = nn.Conv2d(6, 9, 3, stride=2, padding=1, groups=3)
    layer = randomize_(fk.FLoRAConv2d(copy.deepcopy(base), rank=(2, 2), scale=1.5, strategy=strategy, **REF))
    assert [tuple(f.shape) for f in layer.factors] == [(9, 2), (2, 2), (3, 3), (3, 3)]
    x = torch.randn(2, 6, 9, 8)
    dw = einsum_reconstruct(layer.core.detach(), [f.detach() for f in layer.factors], 1.5)
    want = base(x) + torch.nn.functional.conv2d(x, dw, None, 2, 1, 1, 3)
    assert_rel_close(layer(x), want, 1e-5)


@pytest.mark.parametrize("strategy", STRATS)
def test_unbatched_conv_layer(strategy):
    base, layer, _ = _build("conv", CONV_CASES[4], strategy)  # depthwise 'same'
    randomize_(layer)
    x = torch.randn(6, 9, 9)
    y = layer(x)
    assert y.shape == (6, 9, 9)
    assert_rel_close(y, layer(x[None])[0], 1e-6)
    assert layer.plan(x).strategy in STRATS


GRAD_LAYERS = [
    ("Linear", lambda: nn.Linear(4, 3), (2, 4)),
    ("Conv1d-s2-reflect", lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"), (2, 3, 6)),
    ("Conv2d-groups2", lambda: nn.Conv2d(4, 4, (3, 2), padding=1, groups=2), (1, 4, 4, 3)),
    ("Conv3d", lambda: nn.Conv3d(2, 3, 2, padding=(1, 0, 1)), (1, 2, 3, 3, 2)),
]


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("name,make,xshape", GRAD_LAYERS, ids=[g[0] for g in GRAD_LAYERS])
def test_gradcheck_layer(name, make, xshape, strategy):
    """fp64 gradcheck w.r.t. x, the core and every factor."""
    layer = wrap(make().double(), rank=2, kernel_rank=2, scale=0.8, strategy=strategy, **REF)
    assert layer.core.dtype == torch.float64
    randomize_(layer)
    names = ["flora_core.default"] + [f"flora_u{i}.default" for i in range(len(layer.factors))]
    params = [layer.core.detach().clone().requires_grad_(True)] + [
        f.detach().clone().requires_grad_(True) for f in layer.factors
    ]
    x = torch.randn(xshape, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)


# --- dropout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dropout_only_on_adapter_path(kind, strategy):
    case = LINEAR_CASES[0] if kind == "linear" else CONV_CASES[2]
    base, layer, x = _build(kind, case, strategy, dropout=0.5)
    layer.train()
    with torch.no_grad():
        # Zero core: the adapter path is zero whatever dropout does, so output == base exactly.
        assert torch.equal(layer(x), base(x))
        randomize_(layer)
        y1, y2 = layer(x), layer(x)
        assert not torch.allclose(y1, y2), "train mode with p>0 must resample the dropout mask"
        # Dropout is active in train mode: the output is not the undropped adapter's.
        undropped = oracle_output(base, x, layer.core, list(layer.factors), layer.scale)
        assert not torch.allclose(y1.double(), undropped, rtol=1e-4, atol=1e-4)
        layer.eval()
        y3, y4 = layer(x), layer(x)
        assert torch.equal(y3, y4)
        assert_rel_close(y3, undropped, 1e-5, msg="eval ignores dropout")


def test_dropout_train_matches_explicit_mask():
    """Seeded: the adapter's input is dropout(x), the base's input is x."""
    base = nn.Linear(16, 8)
    layer = randomize_(fk.FLoRALinear(copy.deepcopy(base), rank=4, dropout=0.3, strategy="factorized", **REF))
    layer.train()
    x = torch.randn(32, 16)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    xd = torch.nn.functional.dropout(x, 0.3, training=True)
    dw = einsum_reconstruct(layer.core.detach(), [f.detach() for f in layer.factors], layer.scale)
    assert_rel_close(y, base(x) + xd @ dw.t(), 1e-5)


# --- merge / unmerge -------------------------------------------------------------------------


@pytest.mark.parametrize("kind,case", FEW, ids=FEW_IDS)
def test_layer_merge_unmerge(kind, case):
    _, layer, x = _build(kind, case, "factorized")
    randomize_(layer)
    w0 = layer.base.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged
        dw = einsum_reconstruct(layer.core, list(layer.factors), layer.scale)
        assert_close(layer.base.weight, w0 + dw, torch.float32, rtol=1e-5, atol=1e-5)
        assert_rel_close(layer(x), y, 1e-5, msg="merged output")
        layer.merge()  # idempotent
        assert_close(layer.base.weight, w0 + dw, torch.float32, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        assert not layer.merged
        assert_close(layer.base.weight, w0, torch.float32, rtol=1e-5, atol=1e-5)
        assert_rel_close(layer(x), y, 1e-5, msg="unmerged output")


# --- the cost model ---------------------------------------------------------------------------


def test_plan_depthwise_merged_and_big_linear_factorized():
    dw = fk.FLoRAConv2d(nn.Conv2d(64, 64, 7, padding=3, groups=64), rank=16, **REF)
    p = dw.plan(torch.empty(8, 64, 28, 28))
    assert isinstance(p, fk.Plan) and p.factorized_s > 0 and p.merged_s > 0
    assert p.strategy == "merged" and p.merged_s < p.factorized_s, str(p)
    lin = fk.FLoRALinear(nn.Linear(1024, 1024), rank=16, **REF)
    p = lin.plan(torch.empty(8192, 1024))
    assert p.strategy == "factorized" and p.factorized_s < p.merged_s, str(p)
    assert "factorized" in str(p) and "us" in str(p)


@pytest.mark.parametrize(
    "name,make,xshape",
    [("depthwise7x7", lambda: nn.Conv2d(8, 8, 7, padding=3, groups=8), (2, 8, 12, 12)),
     ("linear", lambda: nn.Linear(32, 24), (64, 32)),
     ("conv3x3", lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 10, 10))],
    ids=["depthwise7x7", "linear", "conv3x3"],
)
def test_auto_runs_the_planned_strategy(name, make, xshape, monkeypatch):
    """With measured dispatch off, strategy="auto" runs the cost model's plan."""
    monkeypatch.setenv("FLORA_AUTOTUNE", "0")
    base = make()
    auto = randomize_(wrap(copy.deepcopy(base), rank=4, strategy="auto", **REF))
    x = torch.randn(xshape)
    plan = auto.plan(x)
    outs = {}
    for s in STRATS:
        other = wrap(copy.deepcopy(base), rank=4, strategy=s, **REF)
        other.load_state_dict(auto.state_dict())
        outs[s] = other(x)
    assert not torch.equal(outs["factorized"], outs["merged"]), "strategies agree bitwise: check cannot discriminate"
    y = auto(x)
    assert torch.equal(y, outs[plan.strategy]), f"auto ran something else than {plan}"


def test_strategy_override(monkeypatch):
    """An explicit strategy wins over the plan, both at construction and set later (measured
    dispatch off, so that auto is the plan)."""
    monkeypatch.setenv("FLORA_AUTOTUNE", "0")
    from flora_kernels import reference as ref

    lin = randomize_(fk.FLoRALinear(nn.Linear(64, 48), rank=8, **REF))
    x = torch.randn(256, 64)
    planned = lin.plan(x).strategy
    other = "merged" if planned == "factorized" else "factorized"
    fns = {"merged": ref.linear_merged, "factorized": ref.linear_factorized}
    args = (x, lin.base.weight, lin.base.bias, lin.core, list(lin.factors), lin.scale)
    assert torch.equal(lin(x), fns[planned](*args))
    lin.strategy = other
    assert torch.equal(lin(x), fns[other](*args))
    lin2 = fk.FLoRALinear(copy.deepcopy(lin.base), rank=8, strategy=other, **REF)
    lin2.load_state_dict(lin.state_dict())
    assert torch.equal(lin2(x), fns[other](*args))
    assert not torch.equal(fns["merged"](*args), fns["factorized"](*args)), "the check above cannot discriminate"


# --- dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_half_precision_reference(kind, strategy, dtype):
    if kind == "linear":
        base, x = nn.Linear(24, 16), torch.randn(5, 24)
        layer = fk.FLoRALinear(copy.deepcopy(base).to(dtype), rank=4, strategy=strategy, **REF)
    else:
        base, x = nn.Conv2d(8, 6, 3, padding=1), torch.randn(2, 8, 7, 7)
        layer = fk.FLoRAConv2d(copy.deepcopy(base).to(dtype), rank=4, strategy=strategy, **REF)
    randomize_(layer)
    assert layer.core.dtype == torch.float32 and all(f.dtype == torch.float32 for f in layer.factors)
    with torch.no_grad():
        y = layer(x.to(dtype))
        want = oracle_output(base, x, layer.core, list(layer.factors), layer.scale)
    assert y.dtype == dtype
    rtol, atol = TOL[dtype]
    scale = want.abs().max().item()
    assert_close(y.float(), want, dtype, rtol=rtol, atol=atol * scale, msg=f"{dtype} vs fp32")


def test_half_precision_backward():
    layer = randomize_(fk.FLoRALinear(nn.Linear(16, 8).to(torch.bfloat16), rank=4, **REF))
    x = torch.randn(6, 16, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert layer.core.grad is not None and layer.core.grad.dtype == torch.float32
    assert all(f.grad is not None and f.grad.dtype == torch.float32 for f in layer.factors)


# --- construction ------------------------------------------------------------------------------


def test_layer_shares_and_freezes_base():
    base = nn.Conv2d(4, 6, 3)
    layer = fk.FLoRAConv2d(base, rank=2, kernel_rank=1)
    assert layer.base is base and layer.weight is base.weight and layer.bias is base.bias
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.core.requires_grad and all(f.requires_grad for f in layer.factors)
    assert layer.ranks == (2, 2, 1, 1)
    assert tuple(layer.core.shape) == (2, 2, 1, 1)
    assert fk.FLoRAConv2d(nn.Conv2d(4, 6, (3, 5)), rank=3).ranks == (3, 3, 3, 5)  # full kernel by default
    assert fk.FLoRALinear(nn.Linear(3, 2), rank=(1, 8)).ranks == (1, 3)  # clamped per mode
    assert "ranks=(2, 2, 1, 1)" in repr(layer) and "active" in repr(layer)


@pytest.mark.parametrize("rank", [0, -1, (2, 0), 1.5, True], ids=["0", "neg", "tuple0", "float", "bool"])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match=r"rank: expected a positive int or a tuple of positive ints, got"):
        fk.FLoRALinear(nn.Linear(4, 4), rank=rank)


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match=r"rank: expected an int or 2 ints, got \(1, 2, 3\)"):
        fk.FLoRALinear(nn.Linear(4, 4), rank=(1, 2, 3))
    with pytest.raises(ValueError, match=r"kernel_rank: expected an int or 2 ints, got \(1, 2, 3\)"):
        fk.FLoRAConv2d(nn.Conv2d(4, 4, 3), kernel_rank=(1, 2, 3))
    with pytest.raises(TypeError, match=r"FLoRAConv2d: expected a Conv2d module \(or a subclass\), got Conv1d"):
        fk.FLoRAConv2d(nn.Conv1d(4, 4, 3))
    with pytest.raises(TypeError, match=r"unsupported module type GRU: expected one of Linear"):
        wrap(nn.GRU(4, 4))
    with pytest.raises(ValueError, match=r"strategy: expected one of .*got 'fused'"):
        fk.FLoRALinear(nn.Linear(4, 4), strategy="fused")
    with pytest.raises(ValueError, match=r"backend: expected one of .*got 'gpu'"):
        fk.FLoRALinear(nn.Linear(4, 4), backend="gpu")
    with pytest.raises(ValueError, match=r"dropout: expected a probability in \[0, 1\), got 1.5"):
        fk.FLoRALinear(nn.Linear(4, 4), dropout=1.5)


@pytest.mark.parametrize("name", ["triton", "cuda", "cpp"])
def test_layer_with_unavailable_backend_raises(name):
    reason = fk.available_backends()[name]
    if reason == "ok":
        pytest.skip(f"backend {name} is available here")
    layer = fk.FLoRALinear(nn.Linear(4, 4), rank=2, backend=name)
    with pytest.raises(fk.BackendUnavailable, match=rf"backend '{name}' cannot run linear"):
        layer(torch.randn(2, 4))


def test_linear_ignores_tuple_kernel_rank():
    assert fk.FLoRALinear(nn.Linear(4, 4), rank=2, kernel_rank=(2, 2)).ranks == (2, 2)

"""The ``cpp`` backend (compiled CPU kernels) against the reference backend: outputs and every
gradient over odd shapes, both strategies, dropout with the same mask, and torch.compile.

Skipped when the extension is not built (``pip install --no-build-isolation -e .``).
"""

from __future__ import annotations

import pytest
import torch

import flora_kernels as fk
from flora_kernels.backends import Call
from flora_kernels.backends.ext import CppBackend, load_extension
from flora_kernels.testing import assert_close

_REASON = load_extension()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"extension not built: {_REASON}")



def _leaves(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _compare(fn, inputs: list[torch.Tensor], dtype: torch.dtype) -> None:
    """fn(backend, *inputs) for cpp vs reference: output and the grads of every input."""
    results = []
    for backend in ("cpp", "reference"):
        leaves = _leaves(*inputs)
        out = fn(backend, *leaves)
        gen = torch.Generator().manual_seed(5)
        out.backward(torch.randn(out.shape, generator=gen, dtype=out.dtype))
        results.append([out.detach()] + [t.grad for t in leaves])
    names = ["out"] + [f"grad[{i}]" for i in range(len(inputs))]
    for name, a, b in zip(names, *results, strict=True):
        assert a is not None and b is not None, name
        assert_close(a, b, dtype, msg=name)


def _tucker(shape, ranks, dtype):
    core = torch.randn(*ranks, dtype=dtype)
    factors = [torch.randn(i, r, dtype=dtype) / r**0.5 for i, r in zip(shape, ranks)]
    return core, factors


RECON_CASES = [
    ((5, 7), (1, 1)),
    ((6, 9), (3, 5)),
    ((4, 3, 5), (2, 3, 2)),
    ((5, 2, 3, 3), (3, 1, 2, 3)),
    ((3, 4, 2, 3, 2), (2, 3, 1, 2, 2)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("with_base", [False, True], ids=["nobase", "base"])
@pytest.mark.parametrize("case", RECON_CASES, ids=lambda c: f"N{len(c[0])}-{'x'.join(map(str, c[1]))}")
def test_reconstruct_matches_reference(case, with_base, dtype):
    shape, ranks = case
    core, factors = _tucker(shape, ranks, dtype)
    inputs = [core, *factors] + ([torch.randn(*shape, dtype=dtype)] if with_base else [])
    n = len(shape)

    def fn(backend, core, *rest):
        base = rest[n] if with_base else None
        return fk.tucker_reconstruct(core, list(rest[:n]), 0.8, base, backend=backend)

    _compare(fn, inputs, dtype)


@pytest.mark.parametrize("case", RECON_CASES, ids=lambda c: f"N{len(c[0])}-{'x'.join(map(str, c[1]))}")
def test_project_matches_reference(case):
    shape, ranks = case
    _, factors = _tucker(shape, ranks, torch.float64)
    t = torch.randn(*shape, dtype=torch.float64)

    def fn(backend, t, *fs):
        return fk.tucker_project(t, list(fs), backend=backend)

    _compare(fn, [t, *factors], torch.float64)


# (lead dims of x, in, out, (r_out, r_in))
LINEAR_CASES = [
    ((1,), 1, 1, (1, 1)),
    ((7,), 13, 11, (1, 3)),
    ((2, 5), 24, 17, (5, 4)),
    ((3, 1, 4), 9, 33, (7, 9)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("strategy", ["factorized", "merged"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"x{'x'.join(map(str, c[0]))}-{c[1]}to{c[2]}-r{c[3][0]}x{c[3][1]}")
def test_linear_matches_reference(case, bias, strategy, dtype):
    lead, fin, fout, ranks = case
    x = torch.randn(*lead, fin, dtype=dtype)
    w = torch.randn(fout, fin, dtype=dtype) / fin**0.5
    b = torch.randn(fout, dtype=dtype)
    core, factors = _tucker((fout, fin), ranks, dtype)
    inputs = [x, w, core, *factors] + ([b] if bias else [])

    def fn(backend, x, w, core, f0, f1, *bb):
        return fk.flora_linear(x, w, bb[0] if bb else None, core, [f0, f1], 0.75, strategy=strategy, backend=backend)

    _compare(fn, inputs, dtype)


# (x shape, C_out, kernel, groups, geometry kwargs, ranks)
CONV_CASES = [
    ((2, 3, 11), 5, (3,), 1, {"stride": 2, "padding": 1}, (2, 3, 2)),
    ((1, 4, 9), 6, (4,), 2, {"padding": "same", "padding_mode": "reflect", "dilation": 2}, (1, 2, 3)),
    ((2, 4, 7, 6), 8, (3, 3), 1, {"padding": 1}, (3, 4, 3, 3)),
    ((1, 6, 8, 7), 6, (3, 2), 3, {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)}, (2, 2, 2, 1)),
    ((2, 5, 6, 6), 5, (3, 3), 5, {"padding": 1, "padding_mode": "circular"}, (1, 1, 2, 3)),  # depthwise
    ((1, 4, 7, 7), 10, (5, 5), 2, {"padding": "same", "padding_mode": "replicate"}, (3, 2, 3, 2)),
    ((1, 2, 5, 4, 6), 3, (3, 2, 3), 1, {"padding": 1, "stride": (1, 2, 1)}, (2, 2, 2, 1, 3)),
]


def _conv_id(c):
    return f"{len(c[0]) - 2}d-x{'x'.join(map(str, c[0]))}-g{c[3]}-{'-'.join(f'{k}{v}' for k, v in c[4].items())}"


@pytest.mark.parametrize("strategy", ["factorized", "merged"])
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_conv_matches_reference(case, strategy):
    dtype = torch.float64
    xs, cout, k, g, geo, ranks = case
    x = torch.randn(*xs, dtype=dtype)
    w = torch.randn(cout, xs[1] // g, *k, dtype=dtype) / 3
    b = torch.randn(cout, dtype=dtype)
    core, factors = _tucker(tuple(w.shape), ranks, dtype)

    def fn(backend, x, w, b, core, *fs):
        return fk.flora_conv(x, w, b, core, list(fs), 0.6, groups=g, strategy=strategy, backend=backend, **geo)

    _compare(fn, [x, w, b, core, *factors], dtype)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """t with its channel dim innermost in memory (channels_last for 4-D / 5-D, (N, L, C) for 3-D)."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_conv_channels_last_matches_reference(case):
    """Channels-innermost x and weight: the kernels read x, write y (the base conv's output) and
    accumulate into dx (the base conv's input gradient) through their strides; output and every
    gradient match the reference, and y keeps the channels innermost."""
    dtype = torch.float64
    xs, cout, k, g, geo, ranks = case
    x = _channels_last(torch.randn(*xs, dtype=dtype))
    w = _channels_last(torch.randn(cout, xs[1] // g, *k, dtype=dtype) / 3)
    b = torch.randn(cout, dtype=dtype)
    core, factors = _tucker(tuple(w.shape), ranks, dtype)

    def fn(backend, x, w, b, core, *fs):
        return fk.flora_conv(x, w, b, core, list(fs), 0.6, groups=g, strategy="factorized", backend=backend, **geo)

    _compare(fn, [x, w, b, core, *factors], dtype)
    y, y_ref = fn("cpp", x, w, b, core, *factors), fn("reference", x, w, b, core, *factors)
    # torch's conv output layout (the projection form adds the adapter in place), or channels innermost like x
    # (the folded form, flora::conv_folded: torch's rule, which its CPU 3-D and grouped kernels do not keep)
    assert y.stride() == y_ref.stride() or y.movedim(1, -1).is_contiguous()


def test_conv_fp32_and_unbatched():
    x = torch.randn(4, 9, 8)
    w = torch.randn(6, 2, 3, 3) / 3
    core, factors = _tucker(tuple(w.shape), (3, 2, 2, 3), torch.float32)
    for strategy in ("factorized", "merged"):
        def fn(backend, x, core, *fs, strategy=strategy):
            return fk.flora_conv(x, w, None, core, list(fs), 1.3, groups=2, padding=1, strategy=strategy, backend=backend)

        _compare(fn, [x, core, *factors], torch.float32)


def _mask_like(x: torch.Tensor, p: float, torch_seed: int, strategy: str) -> torch.Tensor:
    """The mask the cpp backend draws after torch.manual_seed(torch_seed): its seeded kernel mask
    on the factorized path; torch's dropout on the merged path (composed above the backends)."""
    torch.manual_seed(torch_seed)
    if strategy == "merged":
        return torch.nn.functional.dropout(torch.ones_like(x), p, training=True)
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    return torch.ops.flora.dropout_mask(x.contiguous(), p, seed)


@pytest.mark.parametrize("strategy", ["factorized", "merged"])
def test_linear_dropout_uses_seeded_mask(strategy):
    p = 0.4
    x, w = torch.randn(3, 6, 10, dtype=torch.float64), torch.randn(7, 10, dtype=torch.float64)
    core, factors = _tucker((7, 10), (3, 4), torch.float64)
    mask = _mask_like(x.reshape(-1, 10), p, 11, strategy).reshape(x.shape)
    leaves = _leaves(x, core, *factors)
    torch.manual_seed(11)
    y = fk.flora_linear(leaves[0], w, None, leaves[1], leaves[2:], 0.9, dropout_p=p, strategy=strategy, backend="cpp")
    ref_leaves = _leaves(x, core, *factors)
    xr, cr, fr = ref_leaves[0], ref_leaves[1], ref_leaves[2:]
    delta = fk.tucker_reconstruct(cr, fr, 0.9, backend="reference")
    y_ref = xr @ w.t() + (xr * mask) @ delta.t()
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("strategy", ["factorized", "merged"])
def test_conv_dropout_uses_seeded_mask(strategy, cl):
    """The mask indexes x's logical elements: the same for a channels_last x."""
    p = 0.3
    x, w = torch.randn(2, 4, 6, 5, dtype=torch.float64), torch.randn(6, 2, 3, 3, dtype=torch.float64)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    core, factors = _tucker(tuple(w.shape), (2, 2, 3, 2), torch.float64)
    mask = _mask_like(x, p, 3, strategy)
    leaves = _leaves(x, core, *factors)
    torch.manual_seed(3)
    y = fk.flora_conv(leaves[0], w, None, leaves[1], leaves[2:], 0.5, padding=1, groups=2, dropout_p=p,
                      strategy=strategy, backend="cpp")
    ref = _leaves(x, core, *factors)
    delta = fk.tucker_reconstruct(ref[1], ref[2:], 0.5, backend="reference")
    y_ref = torch.nn.functional.conv2d(ref[0], w, None, 1, 1, 1, 2) + torch.nn.functional.conv2d(
        ref[0] * mask, delta, None, 1, 1, 1, 2)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad)


def test_backend_reports():
    assert fk.available_backends()["cpp"] == "ok"
    b = CppBackend()
    x = torch.randn(2, 3)

    def call(x):
        return Call.describe("linear", x=x, weight=torch.randn(4, 3), core=torch.randn(2, 2), strategy="factorized")

    assert b.unsupported_reason(call(x)) is None
    assert "meta" in b.unsupported_reason(call(x.to("meta")))
    assert "empty" in b.unsupported_reason(call(torch.randn(0, 3)))
    with pytest.raises(fk.BackendUnavailable, match="cpp"):
        fk.flora_linear(torch.randn(0, 3), torch.randn(4, 3), None, torch.randn(2, 2),
                        [torch.randn(4, 2), torch.randn(3, 2)], strategy="factorized", backend="cpp")


@pytest.mark.parametrize("strategy", ["factorized", "merged"])
def test_torch_compile_fullgraph(strategy):
    torch._dynamo.reset()
    x = torch.randn(2, 5, 12)
    w, b = torch.randn(9, 12), torch.randn(9)
    core, factors = _tucker((9, 12), (3, 4), torch.float32)

    def f(x, core, f0, f1):
        return fk.flora_linear(x, w, b, core, [f0, f1], 0.5, strategy=strategy, backend="cpp").relu().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_leaves, comp_leaves = _leaves(core, *factors), _leaves(core, *factors)
    ref = f(x, *eager_leaves)
    out = compiled(x, *comp_leaves)
    torch.testing.assert_close(out, ref)
    ref.backward()
    out.backward()
    for a, b_ in zip(comp_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b_.grad)


@pytest.mark.parametrize("strategy", ["factorized", "merged"])
def test_autocast_bf16(strategy):
    x = torch.randn(4, 6, 16)
    w, b = torch.randn(12, 16) / 4, torch.randn(12)
    core, factors = _tucker((12, 16), (3, 5), torch.float32)
    ref = fk.flora_linear(x, w, b, core, factors, 0.5, strategy=strategy, backend="reference")
    leaves = _leaves(core, *factors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fk.flora_linear(x, w, b, leaves[0], leaves[1:], 0.5, strategy=strategy, backend="cpp")
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()).item() < 3e-2
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)
    xc, wc = torch.randn(2, 4, 9, 9), torch.randn(6, 4, 3, 3) / 6
    cc, fc = _tucker(tuple(wc.shape), (2, 3, 2, 2), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yc = fk.flora_conv(xc, wc, None, cc, fc, 0.5, padding=1, strategy=strategy, backend="cpp")
    assert yc.dtype == torch.bfloat16


@pytest.mark.parametrize("strategy", ["factorized", "merged"])
def test_torch_compile_fullgraph_conv(strategy):
    torch._dynamo.reset()
    x = torch.randn(2, 4, 7, 7)
    w = torch.randn(6, 2, 3, 3)
    core, factors = _tucker(tuple(w.shape), (2, 2, 2, 3), torch.float32)

    def f(x, core, *fs):
        return fk.flora_conv(x, w, None, core, list(fs), 0.5, padding=1, groups=2, strategy=strategy,
                             backend="cpp").sin().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_leaves, comp_leaves = _leaves(x, core, *factors), _leaves(x, core, *factors)
    ref = f(*eager_leaves)
    out = compiled(*comp_leaves)
    torch.testing.assert_close(out, ref)
    ref.backward()
    out.backward()
    for a, b_ in zip(comp_leaves, eager_leaves, strict=True):
        torch.testing.assert_close(a.grad, b_.grad)

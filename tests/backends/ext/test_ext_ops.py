"""The compiled ``torch.ops.flora`` ops on CPU: op contracts (opcheck), exact semantics against
einsum formulas over odd shapes, and bad input raising clean Python exceptions.

Skipped when the extension is not built (``pip install --no-build-isolation -e .``).
"""

from __future__ import annotations

import math

import pytest
import torch

from flora_kernels.backends.ext import load_extension
from flora_kernels.testing import ELEMENTWISE, assert_close

_REASON = load_extension()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"extension not built: {_REASON}")


def ops():
    return torch.ops.flora


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    assert_close(a.double(), b.double(), dtype)


# (N, groups, C per group, rank, spatial): rank 1, non powers of two, batch 1, depthwise (C = 1).
SHAPES = [
    (1, 1, 1, 1, ()),
    (5, 1, 7, 3, ()),
    (2, 3, 4, 2, (5,)),
    (1, 2, 3, 5, (3, 4)),
    (2, 4, 1, 1, (2, 3, 2)),
]
SHAPE_IDS = [f"N{n}-g{g}-C{c}-r{r}-sp{'x'.join(map(str, sp)) or '0'}" for n, g, c, r, sp in SHAPES]


def _chan(t: torch.Tensor, g: int) -> torch.Tensor:
    """(N, g*C, *sp) -> (N, g, C, P)"""
    return t.reshape(t.shape[0], g, t.shape[1] // g, -1)


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """t with its channel dim innermost in memory (channels_last for 4-D / 5-D, (N, L, C) for 3-D)."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if t.dim() >= 3 else t


def layout_of(t: torch.Tensor) -> torch.memory_format:
    """The layout the ops give new activations computed from t (csrc/flora_checks.h layout_of)."""
    from flora_kernels.backends.ext.ops import layout_of as rule

    return rule(t)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
def test_adapter_ops_match_formulas(shape, dtype, p, cl):
    """Every adapter op against its einsum formula; with cl, every activation channels-innermost
    (read and, for the in-place ops, written through its strides; new outputs in layout_of(input))."""
    n, g, c, r, sp = shape
    o = 3  # out channels per group
    seed = 1234
    lay = channels_last if cl else (lambda t: t)
    x = lay(torch.randn(n, g * c, *sp, dtype=dtype))
    u_in = torch.randn(c, r, dtype=dtype)
    u_out = torch.randn(g * o, r, dtype=dtype)
    y = lay(torch.randn(n, g * o, *sp, dtype=dtype))
    mask = ops().dropout_mask(x, p, seed)  # per logical element, whatever x's strides
    xd = (x.double() * mask.double())
    # shrink: z = U_in^T dropout(x) per group
    z = ops().adapter_shrink(x, u_in, g, p, seed)
    z_ref = torch.einsum("ngcp,ca->ngap", _chan(xd, g), u_in.double()).reshape(n, g * r, *sp)
    close(z, z_ref, dtype)
    assert z.is_contiguous(memory_format=layout_of(x))
    # expand: y += s * U_out_g z
    zz = lay(torch.randn(z.shape, dtype=dtype))
    y2 = y.clone()
    ptr, strides = y2.data_ptr(), y2.stride()
    ops().adapter_expand_(y2, zz, u_out, g, 0.7)
    assert (y2.data_ptr(), y2.stride()) == (ptr, strides)
    y_ref = y.double() + 0.7 * torch.einsum("goa,ngap->ngop", u_out.double().reshape(g, o, r), _chan(zz.double(), g)).reshape(y.shape)
    close(y2, y_ref, dtype)
    # expand out of place, with and without a bias: y = bias + s * U_out_g z
    bias = torch.randn(g * o, dtype=dtype)
    bias_b = bias.double().reshape(1, g * o, *([1] * len(sp)))
    close(ops().adapter_expand(zz, u_out, g, 0.7, bias), y_ref - y.double() + bias_b, dtype)
    close(ops().adapter_expand(zz, u_out, g, 0.7, None), y_ref - y.double(), dtype)
    # expand grad input: dz = s * U_out_g^T dy
    dy = lay(torch.randn(y.shape, dtype=dtype))
    dz = ops().adapter_expand_grad_input(dy, u_out, g, 0.7)
    assert dz.is_contiguous(memory_format=layout_of(dy))
    dz_ref = 0.7 * torch.einsum("goa,ngop->ngap", u_out.double().reshape(g, o, r), _chan(dy.double(), g)).reshape(z.shape)
    close(dz, dz_ref, dtype)
    # shrink grad input: dx = mask * (U_in dz), fresh and accumulated
    dx = ops().adapter_shrink_grad_input(zz, u_in, g, p, seed)
    dx_ref = mask.double() * torch.einsum("ca,ngap->ngcp", u_in.double(), _chan(zz.double(), g)).reshape(x.shape)
    close(dx, dx_ref, dtype)
    acc = lay(torch.randn(x.shape, dtype=dtype))
    acc2 = acc.clone()
    ops().adapter_shrink_grad_input_(acc2, zz, u_in, g, p, seed)
    close(acc2, acc.double() + dx_ref, dtype)
    # factor grads: summed over groups (U_in) or per group (U_out)
    du_in = ops().adapter_factor_grad(x, zz, g, False, 1.0, p, seed)
    close(du_in, torch.einsum("ngcp,ngap->ca", _chan(xd, g), _chan(zz.double(), g)), dtype)
    du_out = ops().adapter_factor_grad(dy, zz, g, True, 0.7, 0.0, 0)
    du_out_ref = 0.7 * torch.einsum("ngop,ngap->goa", _chan(dy.double(), g), _chan(zz.double(), g)).reshape(g * o, r)
    close(du_out, du_out_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_linear_grad_matches_formulas(dtype):
    dy, s, b = torch.randn(37, 20, dtype=dtype), torch.randn(37, 5, dtype=dtype), torch.randn(20, 5, dtype=dtype)
    ds, db = ops().adapter_linear_grad(dy, s, b)
    close(ds, dy.double() @ b.double(), dtype)
    close(db, dy.double().t() @ s.double(), dtype)


def test_dropout_mask_is_seeded_and_scaled():
    x = torch.randn(64, 257)
    m1 = ops().dropout_mask(x, 0.25, 7)
    assert torch.equal(m1, ops().dropout_mask(x, 0.25, 7))
    assert not torch.equal(m1, ops().dropout_mask(x, 0.25, 8))
    vals = m1.unique().tolist()
    assert len(vals) == 2 and vals[0] == 0.0 and vals[1] == pytest.approx(1 / 0.75)
    kept = (m1 > 0).double().mean().item()
    assert abs(kept - 0.75) < 0.02, kept
    assert torch.equal(ops().dropout_mask(x, 0.0, 7), torch.ones_like(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("dims", [(1, 1, 1, 1, 1), (5, 3, 7, 6, 1), (2, 3, 9, 4, 4), (3, 1, 2, 5, 27)],
                         ids=lambda d: "r{}x{}-I{}x{}-T{}".format(*d))
def test_reconstruct_ops_match_formulas(dims, dtype):
    r0, r1, i0, i1, t = dims
    core = torch.randn(r0, r1, t, dtype=dtype)
    u0, u1 = torch.randn(i0, r0, dtype=dtype), torch.randn(i1, r1, dtype=dtype)
    ref = 0.6 * torch.einsum("ia,abt,jb->ijt", u0.double(), core.double(), u1.double())
    close(ops().tucker_reconstruct(core, u0, u1, 0.6, None), ref, dtype)
    base = torch.randn(i0, i1, t, dtype=torch.float32)  # base in another dtype: fused add + cast
    out = ops().tucker_reconstruct(core, u0, u1, 0.6, base)
    assert out.dtype == torch.float32
    close(out, base.double() + ref, dtype if ELEMENTWISE[dtype] > ELEMENTWISE[torch.float32] else torch.float32)
    g = torch.randn(i0, i1, t, dtype=dtype)
    dcore, du0, du1 = ops().tucker_reconstruct_backward(g, core, u0, u1, 0.6)
    gd = g.double()
    close(dcore, 0.6 * torch.einsum("ia,ijt,jb->abt", u0.double(), gd, u1.double()), dtype)
    close(du0, 0.6 * torch.einsum("ijt,abt,jb->ia", gd, core.double(), u1.double()), dtype)
    close(du1, 0.6 * torch.einsum("ijt,abt,ia->jb", gd, core.double(), u0.double()), dtype)


def test_non_contiguous_inputs_are_made_contiguous():
    x = torch.randn(6, 4, 5).transpose(1, 2)  # (6, 5, 4) non-contiguous, channels = 5
    u = torch.randn(8, 5).t()  # (5, 8) non-contiguous
    z = ops().adapter_shrink(x, u, 1, 0.0, 0)
    close(z, torch.einsum("ncp,ca->nap", x.double(), u.double()), torch.float32)
    core = torch.randn(4, 3, 2).transpose(0, 1).contiguous().transpose(0, 1)
    u0, u1 = torch.randn(4, 5).t(), torch.randn(7, 3)
    close(ops().tucker_reconstruct(core, u0, u1, 1.0, None),
          torch.einsum("ia,abt,jb->ijt", u0.double(), core.double(), u1.double()), torch.float32)


# ---- op contracts ---------------------------------------------------------------------------------------
def _samples(dtype=torch.float32):
    x = torch.randn(2, 6, 5, dtype=dtype)
    u_in = torch.randn(3, 2, dtype=dtype)
    u_out = torch.randn(8, 2, dtype=dtype)
    z = torch.randn(2, 4, 5, dtype=dtype)
    y = torch.randn(2, 8, 5, dtype=dtype)
    # channels_last 2-D activations: read and written in place, new outputs channels_last
    x4, z4, y4 = (channels_last(torch.randn(2, ch, 3, 5, dtype=dtype)) for ch in (6, 4, 8))
    core = torch.randn(2, 3, 4, dtype=dtype)
    u0, u1 = torch.randn(5, 2, dtype=dtype), torch.randn(6, 3, dtype=dtype)
    return {
        "tucker_reconstruct": [(core, u0, u1, 0.5, None), (core, u0, u1, 0.5, torch.randn(5, 6, 4, dtype=torch.float64))],
        "tucker_reconstruct_backward": [(torch.randn(5, 6, 4, dtype=dtype), core, u0, u1, 0.5)],
        "adapter_shrink": [(x, u_in, 2, 0.0, 0), (x, u_in, 2, 0.5, 3), (x4, u_in, 2, 0.5, 3)],
        "adapter_expand_": [(y.clone(), z, u_out, 2, 0.5), (y4.clone(), z4, u_out, 2, 0.5)],
        "adapter_expand": [(z, u_out, 2, 0.5, None), (z, u_out, 2, 0.5, torch.randn(8, dtype=dtype)),
                           (z4, u_out, 2, 0.5, None)],
        "adapter_expand_grad_input": [(y, u_out, 2, 0.5), (y4, u_out, 2, 0.5)],
        "adapter_shrink_grad_input": [(z, u_in, 2, 0.2, 5), (z4, u_in, 2, 0.2, 5)],
        "adapter_shrink_grad_input_": [(x.clone(), z, u_in, 2, 0.2, 5), (x4.clone(), z4, u_in, 2, 0.2, 5)],
        "adapter_factor_grad": [(x, z, 2, False, 1.0, 0.2, 5), (y, z, 2, True, 0.5, 0.0, 0),
                                (x4, z4, 2, False, 1.0, 0.2, 5)],
        "adapter_linear_grad": [(torch.randn(7, 8, dtype=dtype), torch.randn(7, 3, dtype=dtype),
                                 torch.randn(8, 3, dtype=dtype))],
        "dropout_mask": [(x, 0.3, 11)],
        "input_fold": [(torch.randn(3, 2, 2, 3, dtype=dtype), u_in, [torch.randn(3, 2, dtype=dtype),
                                                                     torch.randn(5, 3, dtype=dtype)]),
                       (torch.randn(4, 2, 3, dtype=dtype), u_in, [torch.randn(3, 3, dtype=dtype)])],
        "input_fold_backward": [(torch.randn(3, 3, 3, 5, dtype=dtype), torch.randn(3, 2, 2, 3, dtype=dtype), u_in,
                                 [torch.randn(3, 2, dtype=dtype), torch.randn(5, 3, dtype=dtype)])],
    }


@pytest.mark.parametrize("name", list(_samples()), ids=str)
def test_opcheck(name):
    op = getattr(ops(), name)
    for args in _samples()[name]:
        torch.library.opcheck(op, args)


# ---- bad input --------------------------------------------------------------------------------------------
def _bad_calls():
    f = torch.randn
    x, u_in, u_out = f(2, 6, 5), f(3, 2), f(8, 2)
    z, y = f(2, 4, 5), f(2, 8, 5)
    core, u0, u1 = f(2, 3, 4), f(5, 2), f(6, 3)
    meta = torch.device("meta")
    return {
        # shapes
        "shrink-factor-rows": lambda: ops().adapter_shrink(x, f(4, 2), 2, 0.0, 0),
        "shrink-1d-factor": lambda: ops().adapter_shrink(x, f(3), 2, 0.0, 0),
        "shrink-groups-not-dividing": lambda: ops().adapter_shrink(x, u_in, 4, 0.0, 0),
        "shrink-groups-zero": lambda: ops().adapter_shrink(x, u_in, 0, 0.0, 0),
        "shrink-1d-x": lambda: ops().adapter_shrink(f(6), u_in, 2, 0.0, 0),
        "shrink-p-one": lambda: ops().adapter_shrink(x, u_in, 2, 1.0, 0),
        "shrink-p-negative": lambda: ops().adapter_shrink(x, u_in, 2, -0.1, 0),
        "expand-y-channels": lambda: ops().adapter_expand_(f(2, 7, 5), z, u_out, 2, 1.0),
        "expand-spatial": lambda: ops().adapter_expand_(f(2, 8, 4), z, u_out, 2, 1.0),
        # in-place targets: dense with collapsing spatial dims (contiguous, channels_last), not strided slices
        "expand-strided-y": lambda: ops().adapter_expand_(f(2, 8, 10)[:, :, ::2], z, u_out, 2, 1.0),
        "expand-overlapping-y": lambda: ops().adapter_expand_(f(2, 8, 1).expand(2, 8, 5), z, u_out, 2, 1.0),
        "expand-out-bias-shape": lambda: ops().adapter_expand(z, u_out, 2, 1.0, f(7)),
        "expand-out-bias-dtype": lambda: ops().adapter_expand(z, u_out, 2, 1.0, f(8).double()),
        "expand-out-factor-dim": lambda: ops().adapter_expand(z, f(8), 2, 1.0, None),
        "linear-grad-s-rows": lambda: ops().adapter_linear_grad(f(7, 8), f(6, 3), f(8, 3)),
        "linear-grad-b-shape": lambda: ops().adapter_linear_grad(f(7, 8), f(7, 3), f(8, 2)),
        "linear-grad-3d-dy": lambda: ops().adapter_linear_grad(f(7, 8, 1), f(7, 3), f(8, 3)),
        "linear-grad-dtype": lambda: ops().adapter_linear_grad(f(7, 8), f(7, 3).double(), f(8, 3)),
        "expand-grad-factor-rows": lambda: ops().adapter_expand_grad_input(y, f(4, 2), 2, 1.0),
        "shrink-grad-rank": lambda: ops().adapter_shrink_grad_input(z, f(3, 3), 2, 0.0, 0),
        "shrink-grad-inplace-channels": lambda: ops().adapter_shrink_grad_input_(f(2, 5, 5), z, u_in, 2, 0.0, 0),
        "shrink-grad-inplace-strided": lambda: ops().adapter_shrink_grad_input_(
            f(2, 6, 10)[:, :, ::2], z, u_in, 2, 0.0, 0),
        "factor-grad-batch": lambda: ops().adapter_factor_grad(x, f(3, 4, 5), 2, False, 1.0, 0.0, 0),
        "reconstruct-2d-core": lambda: ops().tucker_reconstruct(f(2, 3), u0, u1, 1.0, None),
        "reconstruct-u0-rank": lambda: ops().tucker_reconstruct(core, f(5, 3), u1, 1.0, None),
        "reconstruct-base-shape": lambda: ops().tucker_reconstruct(core, u0, u1, 1.0, f(5, 6, 3)),
        "reconstruct-backward-grad-shape": lambda: ops().tucker_reconstruct_backward(f(5, 6), core, u0, u1, 1.0),
        # dtypes
        "shrink-int": lambda: ops().adapter_shrink(x.long(), u_in.long(), 2, 0.0, 0),
        "shrink-mixed": lambda: ops().adapter_shrink(x, u_in.double(), 2, 0.0, 0),
        "expand-mixed": lambda: ops().adapter_expand_(y.double(), z, u_out, 2, 1.0),
        "reconstruct-int-base": lambda: ops().tucker_reconstruct(core, u0, u1, 1.0, torch.zeros(5, 6, 4, dtype=torch.int32)),
        "reconstruct-mixed": lambda: ops().tucker_reconstruct(core, u0.double(), u1, 1.0, None),
        "factor-grad-mixed": lambda: ops().adapter_factor_grad(x, z.half(), 2, False, 1.0, 0.0, 0),
        "reconstruct-backward-int-grad": lambda: ops().tucker_reconstruct_backward(
            torch.ones(5, 6, 4, dtype=torch.int32), core, u0, u1, 1.0),
        "expand-grad-int": lambda: ops().adapter_expand_grad_input(y.int(), u_out.int(), 2, 1.0),
        "shrink-grad-mixed": lambda: ops().adapter_shrink_grad_input(z, u_in.double(), 2, 0.0, 0),
        "shrink-grad-inplace-mixed": lambda: ops().adapter_shrink_grad_input_(x.double(), z, u_in, 2, 0.0, 0),
        "mask-int": lambda: ops().dropout_mask(torch.ones(3, dtype=torch.int64), 0.5, 0),
        # devices
        "shrink-meta-factor": lambda: ops().adapter_shrink(x, u_in.to(meta), 2, 0.0, 0),
        "reconstruct-meta-u1": lambda: ops().tucker_reconstruct(core, u0, u1.to(meta), 1.0, None),
        "reconstruct-backward-meta-grad": lambda: ops().tucker_reconstruct_backward(
            torch.randn(5, 6, 4, device=meta), core, u0, u1, 1.0),
        "expand-grad-meta-factor": lambda: ops().adapter_expand_grad_input(y, u_out.to(meta), 2, 1.0),
        "shrink-grad-meta-factor": lambda: ops().adapter_shrink_grad_input(z, u_in.to(meta), 2, 0.0, 0),
        "shrink-grad-inplace-meta": lambda: ops().adapter_shrink_grad_input_(x, z.to(meta), u_in, 2, 0.0, 0),
        "factor-grad-meta": lambda: ops().adapter_factor_grad(x, z.to(meta), 2, False, 1.0, 0.0, 0),
        "expand-meta-y": lambda: ops().adapter_expand_(y.to(meta), z, u_out, 2, 1.0),
        # empty
        "shrink-empty-x": lambda: ops().adapter_shrink(f(0, 6, 5), u_in, 2, 0.0, 0),
        "shrink-empty-factor": lambda: ops().adapter_shrink(f(2, 6, 5), f(3, 0), 2, 0.0, 0),
        "reconstruct-empty": lambda: ops().tucker_reconstruct(f(2, 3, 0), u0, u1, 1.0, None),
        "factor-grad-empty": lambda: ops().adapter_factor_grad(f(0, 6, 5), f(0, 4, 5), 2, False, 1.0, 0.0, 0),
        "mask-empty": lambda: ops().dropout_mask(f(0), 0.5, 0),
        "shrink-grad-empty": lambda: ops().adapter_shrink_grad_input(f(2, 4, 0), u_in, 2, 0.0, 0),
        "expand-grad-empty": lambda: ops().adapter_expand_grad_input(f(2, 8, 0), u_out, 2, 1.0),
    }


@pytest.mark.parametrize("case", list(_bad_calls()), ids=str)
def test_bad_input_raises(case):
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        _bad_calls()[case]()
    assert "expected" in str(info.value).lower(), str(info.value)


def test_ops_listed():
    from flora_kernels.backends.ext.ops import OPS

    assert all(hasattr(ops(), name) for name in OPS)
    assert math.isfinite(ops().dropout_mask(torch.ones(4), 0.5, 1).sum().item())


# Shapes large enough that the CPU kernels split the work into several row blocks / position tiles
# (staged dropout / cast paths) and the reconstruct into several cast-back chunks.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2100, 1, 40, 3, ()), (700, 2, 20, 4, ()), (2, 2, 8, 3, (70, 90))],
                         ids=["rows2100", "rows700-g2", "P6300-g2"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
def test_adapter_ops_blocked_match_formulas(shape, dtype, p, cl):
    test_adapter_ops_match_formulas(shape, dtype, p, cl)


@pytest.mark.parametrize("core_dtype,base_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                                   (torch.float32, torch.float64), (torch.float16, None)], ids=str)
@pytest.mark.parametrize("dims", [(3, 3, 300, 150, 3), (40, 3, 20, 300, 3)], ids=["orderA", "orderB"])
def test_reconstruct_chunked_casts_match_formulas(dims, core_dtype, base_dtype):
    r0, r1, i0, i1, t = dims
    core = torch.randn(r0, r1, t, dtype=core_dtype)
    u0, u1 = torch.randn(i0, r0, dtype=core_dtype), torch.randn(i1, r1, dtype=core_dtype)
    ref = 0.6 * torch.einsum("ia,abt,jb->ijt", u0.double(), core.double(), u1.double())
    base = None if base_dtype is None else torch.randn(i0, i1, t, dtype=base_dtype)
    out = ops().tucker_reconstruct(core, u0, u1, 0.6, base)
    assert out.dtype == (core_dtype if base is None else base_dtype) and out.shape == (i0, i1, t)
    worst = max([core_dtype] + ([base_dtype] if base is not None else []), key=lambda d: ELEMENTWISE[d])
    close(out, ref if base is None else base.double() + ref, worst)

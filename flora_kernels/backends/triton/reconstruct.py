"""Tucker reconstruct and its adjoint for N = 2..5 modes, fused in Triton.

The spatial modes (2..N-1) are folded into a tiny core kernel ``K = G x_2 U_2 ...`` of shape
(r_0, r_1, T), T = prod(I_2..I_{N-1}), in torch. One kernel then writes, for every tap t,

    W[:, :, t] = base[:, :, t] + s * U_0 K[:, :, t] U_1^T        (I_0, I_1, T)

in the output dtype with fp32 accumulation. The adjoint (backward, and ``project``) reads the
incoming (I_0, I_1, T) gradient block-wise in two passes:

- rows:    P = g_t U_1 per row block; dU_0 += s P K_t^T; dK_t += s U_0^T P
- columns: dU_1 += s g_t^T (U_0 K_t) per column block

with per-program partial sums reduced in torch (each partial is at most I_n x r_n per split).

Layers: @triton.jit kernels, launchers (checks, block sizes), torch.library custom ops with
fake and autograd registrations (namespace ``flora_triton``), and the backend entry points.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...tucker import core_kernel, mode_n_product
from ..oplib import fake
from ._common import INTERPRET, MAX_RANK, dot_precision, rank_pad, split_for, tile_cap

# ----------------------------------------------------------------------------- kernels


def _fwd_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BM": 32, "BN": 32}, num_warps=4)]
    return [
        triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=2)
        for bm, bn, w in ((64, 64, 4), (64, 128, 4), (128, 64, 8), (128, 128, 8))
    ]


_MAX_FWD_BM = 128  # the largest BM of _fwd_configs


@triton.autotune(configs=_fwd_configs(), key=["I0", "I1", "T", "R0P", "R1P"])
@triton.jit
def _tucker2_fwd_kernel(
    u0_ptr, k_ptr, u1_ptr, base_ptr, out_ptr, I0, I1, T, R0, R1, scale,
    HAS_BASE: tl.constexpr, WIDE: tl.constexpr, R0P: tl.constexpr, R1P: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """out[i, j, t] = base[i, j, t] + scale * sum_ab U0[i, a] K[a, b, t] U1[j, b].

    The tile's element offsets are int32 relative to its first element (int64), unless WIDE
    (a BM-row slab spans 2^31 elements or more): half the address registers."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid % T  # taps vary fastest: neighbouring programs write interleaved elements
    tile = pid // T
    n_tiles_n = tl.cdiv(I1, BN)
    pid_m = tile // n_tiles_n
    pid_n = tile % n_tiles_n
    offs_m = pid_m * BM + tl.arange(0, BM).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN).to(tl.int64)
    offs_a = tl.arange(0, R0P)
    offs_b = tl.arange(0, R1P)
    mask_m = offs_m < I0
    mask_n = offs_n < I1
    mask_a = offs_a < R0
    mask_b = offs_b < R1
    u0 = tl.load(u0_ptr + offs_m[:, None] * R0 + offs_a[None, :], mask=mask_m[:, None] & mask_a[None, :], other=0.0)
    k = tl.load(k_ptr + (offs_a[:, None] * R1 + offs_b[None, :]) * T + t, mask=mask_a[:, None] & mask_b[None, :], other=0.0)
    u1 = tl.load(u1_ptr + offs_n[:, None] * R1 + offs_b[None, :], mask=mask_n[:, None] & mask_b[None, :], other=0.0)
    a = tl.dot(u0, k, input_precision=PREC)  # (BM, R1P) fp32
    acc = tl.dot(a, tl.trans(u1).to(tl.float32), input_precision=PREC) * scale
    first = (pid_m * BM * I1 + pid_n * BN) * T + t
    if WIDE:
        local = (tl.arange(0, BM).to(tl.int64)[:, None] * I1 + tl.arange(0, BN)[None, :]) * T
    else:
        local = (tl.arange(0, BM)[:, None] * I1 + tl.arange(0, BN)[None, :]) * T
    mask_out = mask_m[:, None] & mask_n[None, :]
    if HAS_BASE:
        acc += tl.load(base_ptr + first + local, mask=mask_out, other=0.0).to(tl.float32)
    tl.store(out_ptr + first + local, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _tucker2_adj_rows_kernel(
    g_ptr, u0_ptr, k_ptr, u1_ptr, du0_part_ptr, dk_part_ptr, I0, I1, T, R0, R1, scale, SPLIT, blocks_per_split,
    NEED_DU0: tl.constexpr, NEED_DK: tl.constexpr, R0P: tl.constexpr, R1P: tl.constexpr,
    PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """Row pass over g (I0, I1, T): P = g[rows, cols_split, t] U1[cols_split];
    du0_part[split * T + t, rows] = scale * P K_t^T; dk_part[row_block * SPLIT + split, :, :, t] = scale * U0[rows]^T P.
    """
    pid = tl.program_id(0).to(tl.int64)
    t = pid % T
    rest = pid // T
    split = rest % SPLIT
    pid_m = rest // SPLIT
    offs_m = pid_m * BM + tl.arange(0, BM).to(tl.int64)
    offs_a = tl.arange(0, R0P)
    offs_b = tl.arange(0, R1P)
    mask_m = offs_m < I0
    mask_a = offs_a < R0
    mask_b = offs_b < R1
    p = tl.zeros((BM, R1P), dtype=tl.float32)
    n_blocks = tl.cdiv(I1, BN)
    jb_end = tl.minimum((split + 1) * blocks_per_split, n_blocks)
    for jb in range(split * blocks_per_split, jb_end):
        offs_n = jb * BN + tl.arange(0, BN).to(tl.int64)
        mask_n = offs_n < I1
        g = tl.load(g_ptr + (offs_m[:, None] * I1 + offs_n[None, :]) * T + t, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        u1 = tl.load(u1_ptr + offs_n[:, None] * R1 + offs_b[None, :], mask=mask_n[:, None] & mask_b[None, :], other=0.0)
        p = tl.dot(g.to(u1.dtype), u1, p, input_precision=PREC)
    p = p * scale
    if NEED_DU0:
        k = tl.load(k_ptr + (offs_a[:, None] * R1 + offs_b[None, :]) * T + t, mask=mask_a[:, None] & mask_b[None, :], other=0.0)
        du0 = tl.dot(p, tl.trans(k).to(tl.float32), input_precision=PREC)  # (BM, R0P)
        dst = du0_part_ptr + ((split * T + t) * I0 + offs_m[:, None]) * R0 + offs_a[None, :]
        tl.store(dst, du0, mask=mask_m[:, None] & mask_a[None, :])
    if NEED_DK:
        u0 = tl.load(u0_ptr + offs_m[:, None] * R0 + offs_a[None, :], mask=mask_m[:, None] & mask_a[None, :], other=0.0)
        dk = tl.dot(tl.trans(u0).to(tl.float32), p, input_precision=PREC)  # (R0P, R1P)
        dst = dk_part_ptr + (((pid_m * SPLIT + split) * R0 + offs_a[:, None]) * R1 + offs_b[None, :]) * T + t
        tl.store(dst, dk, mask=mask_a[:, None] & mask_b[None, :])


@triton.jit
def _tucker2_adj_cols_kernel(
    g_ptr, u0_ptr, k_ptr, du1_part_ptr, I0, I1, T, R0, R1, scale, SPLIT, blocks_per_split,
    R0P: tl.constexpr, R1P: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """Column pass: du1_part[split * T + t, cols] = scale * sum_{rows in split} g[rows, cols, t]^T (U0[rows] K_t)."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid % T
    rest = pid // T
    split = rest % SPLIT
    pid_n = rest // SPLIT
    offs_n = pid_n * BN + tl.arange(0, BN).to(tl.int64)
    offs_a = tl.arange(0, R0P)
    offs_b = tl.arange(0, R1P)
    mask_n = offs_n < I1
    mask_a = offs_a < R0
    mask_b = offs_b < R1
    k = tl.load(k_ptr + (offs_a[:, None] * R1 + offs_b[None, :]) * T + t, mask=mask_a[:, None] & mask_b[None, :], other=0.0)
    acc = tl.zeros((BN, R1P), dtype=tl.float32)
    n_blocks = tl.cdiv(I0, BM)
    ib_end = tl.minimum((split + 1) * blocks_per_split, n_blocks)
    for ib in range(split * blocks_per_split, ib_end):
        offs_m = ib * BM + tl.arange(0, BM).to(tl.int64)
        mask_m = offs_m < I0
        u0 = tl.load(u0_ptr + offs_m[:, None] * R0 + offs_a[None, :], mask=mask_m[:, None] & mask_a[None, :], other=0.0)
        q = tl.dot(u0, k, input_precision=PREC)  # (BM, R1P)
        g = tl.load(g_ptr + (offs_m[:, None] * I1 + offs_n[None, :]) * T + t, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(tl.trans(g).to(tl.float32), q, acc, input_precision=PREC)
    dst = du1_part_ptr + ((split * T + t) * I1 + offs_n[:, None]) * R1 + offs_b[None, :]
    tl.store(dst, acc * scale, mask=mask_n[:, None] & mask_b[None, :])


# ----------------------------------------------------------------------------- launchers


def _check_pair(u0: Tensor, k: Tensor, u1: Tensor) -> tuple[int, int, int, int, int]:
    torch._check(k.dim() == 3, lambda: f"K: expected (r0, r1, T), got shape {tuple(k.shape)}")
    torch._check(u0.dim() == 2 and u0.shape[1] == k.shape[0], lambda: f"U0: expected (I0, {k.shape[0]}), got {tuple(u0.shape)}")
    torch._check(u1.dim() == 2 and u1.shape[1] == k.shape[1], lambda: f"U1: expected (I1, {k.shape[1]}), got {tuple(u1.shape)}")
    torch._check(u0.dtype == k.dtype == u1.dtype, lambda: f"expected one dtype for U0, K, U1, got {u0.dtype}, {k.dtype}, {u1.dtype}")
    torch._check(max(k.shape[0], k.shape[1]) <= MAX_RANK, lambda: f"ranks: expected <= {MAX_RANK}, got {tuple(k.shape[:2])}")
    return u0.shape[0], u1.shape[0], k.shape[2], k.shape[0], k.shape[1]


def tucker2_forward(u0: Tensor, k: Tensor, u1: Tensor, base: Tensor | None, scale: float) -> Tensor:
    """base + scale * U0 K_t U1^T for every t. u0 (I0, r0), k (r0, r1, T), u1 (I1, r1),
    base (I0, I1, T) or None. Returns (I0, I1, T), contiguous, in base.dtype (else k.dtype)."""
    i0, i1, t, r0, r1 = _check_pair(u0, k, u1)
    out = torch.empty((i0, i1, t), dtype=base.dtype if base is not None else k.dtype, device=k.device)
    if out.numel() == 0:
        return out
    if base is not None:
        torch._check(tuple(base.shape) == (i0, i1, t), lambda: f"base: expected {(i0, i1, t)}, got {tuple(base.shape)}")
        base = base.contiguous()
    u0, k, u1 = u0.contiguous(), k.contiguous(), u1.contiguous()

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(i0, meta["BM"]) * triton.cdiv(i1, meta["BN"]) * t,)

    _tucker2_fwd_kernel[grid](
        u0, k, u1, base if base is not None else out, out, i0, i1, t, r0, r1, float(scale),
        HAS_BASE=base is not None, WIDE=_MAX_FWD_BM * i1 * t >= 2**31,
        R0P=rank_pad(r0), R1P=rank_pad(r1), PREC=dot_precision(k.dtype),
    )
    return out


def tucker2_adjoint(
    g: Tensor, u0: Tensor, k: Tensor | None, u1: Tensor, scale: float,
    need_du0: bool, need_dk: bool, need_du1: bool, split: int | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``tucker2_forward`` for an incoming g (I0, I1, T):
    dU0 = s sum_t g_t U1 K_t^T (I0, r0), dK_t = s U0^T g_t U1 (r0, r1, T), dU1 = s sum_t g_t^T U0 K_t (I1, r1),
    in the factors' dtype; None where not asked. ``k`` may be None when only dK is asked.
    ``split`` overrides how many ways each reduction loop is split (default: fill the device)."""
    kk = k if k is not None else u0.new_empty((u0.shape[1], u1.shape[1], g.shape[2]))
    i0, i1, t, r0, r1 = _check_pair(u0, kk, u1)
    torch._check(tuple(g.shape) == (i0, i1, t), lambda: f"grad: expected {(i0, i1, t)}, got {tuple(g.shape)}")
    torch._check(k is not None or not (need_du0 or need_du1), lambda: "K is needed for dU0 and dU1")
    g, u0, u1, kk = g.contiguous(), u0.contiguous(), u1.contiguous(), kk.contiguous()
    dt, dev = u0.dtype, u0.device
    r0p, r1p, prec = rank_pad(r0), rank_pad(r1), dot_precision(dt)
    du0 = dk = du1 = None
    if need_du0 or need_dk:
        bm = bn = tile_cap(dt)
        nm, nn = triton.cdiv(i0, bm), triton.cdiv(i1, bn)
        sp = split or split_for(nn, nm * t, dev)
        per = triton.cdiv(nn, sp)
        sp = triton.cdiv(nn, per) if nn else 1
        du0_part = torch.zeros((sp * t, i0, r0), dtype=torch.float32, device=dev) if need_du0 else g
        dk_part = torch.zeros((nm * sp, r0, r1, t), dtype=torch.float32, device=dev) if need_dk else g
        if g.numel() and r0 and r1:
            _tucker2_adj_rows_kernel[(nm * sp * t,)](
                g, u0, kk, u1, du0_part, dk_part, i0, i1, t, r0, r1, float(scale), sp, per,
                NEED_DU0=need_du0, NEED_DK=need_dk, R0P=r0p, R1P=r1p, PREC=prec, BM=bm, BN=bn,
            )
        du0 = du0_part.sum(0).to(dt) if need_du0 else None
        dk = dk_part.sum(0).to(dt) if need_dk else None
    if need_du1:
        bm = bn = tile_cap(dt)
        nm, nn = triton.cdiv(i0, bm), triton.cdiv(i1, bn)
        sp = split or split_for(nm, nn * t, dev)
        per = triton.cdiv(nm, sp)
        sp = triton.cdiv(nm, per) if nm else 1
        du1_part = torch.zeros((sp * t, i1, r1), dtype=torch.float32, device=dev)
        if g.numel() and r0 and r1:
            _tucker2_adj_cols_kernel[(nn * sp * t,)](
                g, u0, kk, du1_part, i0, i1, t, r0, r1, float(scale), sp, per,
                R0P=r0p, R1P=r1p, PREC=prec, BM=bm, BN=bn,
            )
        du1 = du1_part.sum(0).to(dt)
    return du0, dk, du1


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("flora_triton::tucker2", mutates_args=())
def tucker2(u0: Tensor, k: Tensor, u1: Tensor, base: Tensor | None, scale: float) -> Tensor:
    """(I0, I1, T) = base + scale * U0 K_t U1^T; see ``tucker2_forward``."""
    return tucker2_forward(u0, k, u1, base, scale)


@fake(tucker2)
def _(u0: Tensor, k: Tensor, u1: Tensor, base: Tensor | None, scale: float) -> Tensor:
    return k.new_empty((u0.shape[0], u1.shape[0], k.shape[2]), dtype=base.dtype if base is not None else k.dtype)


@torch.library.custom_op("flora_triton::tucker2_adjoint", mutates_args=())
def tucker2_adjoint_op(
    g: Tensor, u0: Tensor, k: Tensor | None, u1: Tensor, scale: float, need_du0: bool, need_dk: bool, need_du1: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(dU0, dK, dU1) of ``tucker2``; an empty tensor where not asked."""
    du0, dk, du1 = tucker2_adjoint(g, u0, k, u1, scale, need_du0, need_dk, need_du1)
    empty = u0.new_empty(0)
    return (du0 if du0 is not None else empty, dk if dk is not None else empty.clone(),
            du1 if du1 is not None else empty.clone())


@fake(tucker2_adjoint_op)
def _(g, u0, k, u1, scale, need_du0, need_dk, need_du1):  # type: ignore[no-untyped-def]
    r0, r1, t = u0.shape[1], u1.shape[1], g.shape[2]
    return (u0.new_empty(u0.shape if need_du0 else (0,)), u0.new_empty((r0, r1, t) if need_dk else (0,)),
            u1.new_empty(u1.shape if need_du1 else (0,)))


def _tucker2_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    u0, k, u1, base, scale = inputs
    ctx.save_for_backward(u0, k, u1)
    ctx.scale = scale
    ctx.base_dtype = base.dtype if base is not None else None


def _tucker2_backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def]
    u0, k, u1 = ctx.saved_tensors
    need_u0, need_k, need_u1, need_base = ctx.needs_input_grad[:4]
    du0 = dk = du1 = None
    if need_u0 or need_k or need_u1:
        du0, dk, du1 = tucker2_adjoint_op(grad, u0, k, u1, ctx.scale, need_u0, need_k, need_u1)
    dbase = grad.to(ctx.base_dtype) if need_base and ctx.base_dtype is not None else None
    return (du0 if need_u0 else None, dk if need_k else None, du1 if need_u1 else None, dbase, None)


tucker2.register_autograd(_tucker2_backward, setup_context=_tucker2_setup)


@torch.library.custom_op("flora_triton::project2", mutates_args=())
def project2(g: Tensor, u0: Tensor, u1: Tensor) -> Tensor:
    """(r0, r1, T) = U0^T g_t U1 for every t; g (I0, I1, T) in any float dtype, result in U0's dtype."""
    return tucker2_adjoint(g, u0, None, u1, 1.0, False, True, False)[1]  # type: ignore[return-value]


@fake(project2)
def _(g: Tensor, u0: Tensor, u1: Tensor) -> Tensor:
    return u0.new_empty((u0.shape[1], u1.shape[1], g.shape[2]))


def _project2_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    g, u0, u1 = inputs
    ctx.save_for_backward(g, u0, u1)
    ctx.g_dtype = g.dtype


def _project2_backward(ctx, dp: Tensor):  # type: ignore[no-untyped-def]
    g, u0, u1 = ctx.saved_tensors
    need_g, need_u0, need_u1 = ctx.needs_input_grad
    dp = dp.to(u0.dtype)
    dg = tucker2(u0, dp, u1, None, 1.0).to(ctx.g_dtype) if need_g else None
    du0 = du1 = None
    if need_u0 or need_u1:
        du0, _, du1 = tucker2_adjoint_op(g, u0, dp, u1, 1.0, need_u0, False, need_u1)
    return dg, du0 if need_u0 else None, du1 if need_u1 else None


project2.register_autograd(_project2_backward, setup_context=_project2_setup)


# ----------------------------------------------------------------------------- entry points


def reconstruct(core: Tensor, factors: Sequence[Tensor], scale: float, base: Tensor | None) -> Tensor:
    """base + scale * G x_0 U_0 ... x_{N-1} U_{N-1}: (I_0..I_{N-1}) in base.dtype, else core.dtype.
    Factors are cast to the core's dtype."""
    fs = [f.to(core.dtype) for f in factors]
    out_shape = tuple(f.shape[0] for f in fs)
    k = core_kernel(core, fs).reshape(core.shape[0], core.shape[1], -1)
    base3 = base.reshape(out_shape[0], out_shape[1], k.shape[2]) if base is not None else None
    return tucker2(fs[0], k, fs[1], base3, scale).reshape(out_shape)


def project(t: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """t x_0 U_0^T ... x_{N-1} U_{N-1}^T: (r_0..r_{N-1}) in t's dtype (factors are cast to it)."""
    fs = [f.to(t.dtype) for f in factors]
    p = project2(t.reshape(t.shape[0], t.shape[1], -1), fs[0], fs[1]).reshape(fs[0].shape[1], fs[1].shape[1], *t.shape[2:])
    for n in range(2, t.dim()):
        p = mode_n_product(p, fs[n].transpose(0, 1), n)
    return p

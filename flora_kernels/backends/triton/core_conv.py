"""The small core conv of the factorized FLoRA conv, as direct (implicit-GEMM) Triton kernels.

u = conv(z, K) with z (N, G r_in, *spatial), K (r_out, r_in, *kernel) shared by the G groups,
the base layer's stride, dilation and zero padding (before/after per dim; other padding modes
are applied to the tiny z in torch first), d = 1, 2, 3 (lower d run as 3-D with unit dims).
Each program owns a block of output positions of one (sample, group) and loops over the taps,
gathering the shifted z rows and accumulating ``z_tap (BL, r_in) @ K_tap (r_in, r_out)`` with
``tl.dot``. Backward: dz by the same gather in the transposed direction (a tap contributes
where the stride divides the offset), dK as a reduction over samples, groups and positions
with per-split fp32 partials summed in torch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..oplib import fake
from ._common import INTERPRET, MAX_RANK, alloc_like, dot_precision, rank_pad, split_for

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _unflatten3(offs, D2, D3):
    """A flat index over a (D1, D2, D3) grid -> its three coordinates."""
    return offs // (D2 * D3), (offs // D3) % D2, offs % D3


@triton.jit
def _core_conv_fwd_kernel(
    z_ptr, k_ptr, u_ptr, G, RI, RO, S1, S2, S3, O1, O2, O3, K2, K3, T,
    st1, st2, st3, pd1, pd2, pd3, dl1, dl2, dl3,
    szn, szc, sz1, sz2, sz3, sun, suc, su1, su2, su3,
    RIP: tl.constexpr, ROP: tl.constexpr, PREC: tl.constexpr, BL: tl.constexpr,
):
    """u[n, g*RO + o, p] = sum_{t, c} z[n, g*RI + c, p*st - pad + k_t*dil] K[o, c, t] (zero outside z)."""
    pid = tl.program_id(0).to(tl.int64)
    n_pb = tl.cdiv(O1 * O2 * O3, BL)
    pid_b = pid // n_pb
    n = pid_b // G
    g = pid_b % G
    offs_p = (pid % n_pb) * BL + tl.arange(0, BL).to(tl.int64)
    mask_p = offs_p < O1 * O2 * O3
    o1, o2, o3 = _unflatten3(offs_p, O2, O3)
    offs_c = tl.arange(0, RIP)
    offs_o = tl.arange(0, ROP)
    mask_c = offs_c < RI
    mask_o = offs_o < RO
    acc = tl.zeros((BL, ROP), dtype=tl.float32)
    for t in range(T):
        k1 = t // (K2 * K3)
        k2 = (t // K3) % K2
        k3 = t % K3
        i1 = o1 * st1 - pd1 + k1 * dl1
        i2 = o2 * st2 - pd2 + k2 * dl2
        i3 = o3 * st3 - pd3 + k3 * dl3
        ok = mask_p & (i1 >= 0) & (i1 < S1) & (i2 >= 0) & (i2 < S2) & (i3 >= 0) & (i3 < S3)
        src = z_ptr + n * szn + (g * RI + offs_c[None, :]) * szc + (i1 * sz1 + i2 * sz2 + i3 * sz3)[:, None]
        zt = tl.load(src, mask=ok[:, None] & mask_c[None, :], other=0.0)
        kt = tl.load(k_ptr + (offs_o[None, :] * RI + offs_c[:, None]) * T + t, mask=mask_c[:, None] & mask_o[None, :], other=0.0)
        acc = tl.dot(zt, kt.to(zt.dtype), acc, input_precision=PREC)
    dst = u_ptr + n * sun + (g * RO + offs_o[None, :]) * suc + (o1 * su1 + o2 * su2 + o3 * su3)[:, None]
    tl.store(dst, acc.to(u_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_o[None, :])


@triton.jit
def _core_conv_dz_kernel(
    du_ptr, k_ptr, dz_ptr, G, RI, RO, S1, S2, S3, O1, O2, O3, K2, K3, T,
    st1, st2, st3, pd1, pd2, pd3, dl1, dl2, dl3,
    sun, suc, su1, su2, su3, szn, szc, sz1, sz2, sz3,
    RIP: tl.constexpr, ROP: tl.constexpr, PREC: tl.constexpr, BL: tl.constexpr,
):
    """dz[n, g*RI + c, q] = sum_{t, o} du[n, g*RO + o, p] K[o, c, t] over p*st - pad + k_t*dil = q."""
    pid = tl.program_id(0).to(tl.int64)
    n_qb = tl.cdiv(S1 * S2 * S3, BL)
    pid_b = pid // n_qb
    n = pid_b // G
    g = pid_b % G
    offs_q = (pid % n_qb) * BL + tl.arange(0, BL).to(tl.int64)
    mask_q = offs_q < S1 * S2 * S3
    q1, q2, q3 = _unflatten3(offs_q, S2, S3)
    offs_c = tl.arange(0, RIP)
    offs_o = tl.arange(0, ROP)
    mask_c = offs_c < RI
    mask_o = offs_o < RO
    acc = tl.zeros((BL, RIP), dtype=tl.float32)
    for t in range(T):
        k1 = t // (K2 * K3)
        k2 = (t // K3) % K2
        k3 = t % K3
        a1 = q1 + pd1 - k1 * dl1
        a2 = q2 + pd2 - k2 * dl2
        a3 = q3 + pd3 - k3 * dl3
        p1 = a1 // st1
        p2 = a2 // st2
        p3 = a3 // st3
        ok = mask_q & (a1 >= 0) & (a2 >= 0) & (a3 >= 0) & (p1 * st1 == a1) & (p2 * st2 == a2) & (p3 * st3 == a3)
        ok = ok & (p1 < O1) & (p2 < O2) & (p3 < O3)
        src = du_ptr + n * sun + (g * RO + offs_o[None, :]) * suc + (p1 * su1 + p2 * su2 + p3 * su3)[:, None]
        dut = tl.load(src, mask=ok[:, None] & mask_o[None, :], other=0.0)
        kt = tl.load(k_ptr + (offs_o[:, None] * RI + offs_c[None, :]) * T + t, mask=mask_o[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(dut, kt.to(dut.dtype), acc, input_precision=PREC)
    dst = dz_ptr + n * szn + (g * RI + offs_c[None, :]) * szc + (q1 * sz1 + q2 * sz2 + q3 * sz3)[:, None]
    tl.store(dst, acc.to(dz_ptr.dtype.element_ty), mask=mask_q[:, None] & mask_c[None, :])


@triton.jit
def _core_conv_dk_kernel(
    du_ptr, z_ptr, part_ptr, NG, G, RI, RO, S1, S2, S3, O1, O2, O3, K2, K3, T, SPLIT,
    st1, st2, st3, pd1, pd2, pd3, dl1, dl2, dl3,
    sun, suc, su1, su2, su3, szn, szc, sz1, sz2, sz3,
    RIP: tl.constexpr, ROP: tl.constexpr, PREC: tl.constexpr, BL: tl.constexpr,
):
    """part[split, o, c, t] = sum over the split's (n, g, p) of du[n, g*RO + o, p] z[n, g*RI + c, p*st - pad + k_t*dil]."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid % T
    split = pid // T
    k1 = t // (K2 * K3)
    k2 = (t // K3) % K2
    k3 = t % K3
    offs_c = tl.arange(0, RIP)
    offs_o = tl.arange(0, ROP)
    mask_c = offs_c < RI
    mask_o = offs_o < RO
    n_pb = tl.cdiv(O1 * O2 * O3, BL)
    acc = tl.zeros((ROP, RIP), dtype=tl.float32)
    for it in range(split, NG * n_pb, SPLIT):
        pid_b = it // n_pb
        n = pid_b // G
        g = pid_b % G
        offs_p = (it % n_pb) * BL + tl.arange(0, BL).to(tl.int64)
        mask_p = offs_p < O1 * O2 * O3
        o1, o2, o3 = _unflatten3(offs_p, O2, O3)
        i1 = o1 * st1 - pd1 + k1 * dl1
        i2 = o2 * st2 - pd2 + k2 * dl2
        i3 = o3 * st3 - pd3 + k3 * dl3
        ok = mask_p & (i1 >= 0) & (i1 < S1) & (i2 >= 0) & (i2 < S2) & (i3 >= 0) & (i3 < S3)
        dut = tl.load(du_ptr + n * sun + (g * RO + offs_o[None, :]) * suc + (o1 * su1 + o2 * su2 + o3 * su3)[:, None],
                      mask=mask_p[:, None] & mask_o[None, :], other=0.0)
        zt = tl.load(z_ptr + n * szn + (g * RI + offs_c[None, :]) * szc + (i1 * sz1 + i2 * sz2 + i3 * sz3)[:, None],
                     mask=ok[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(tl.trans(dut), zt.to(dut.dtype), acc, input_precision=PREC)
    dst = part_ptr + ((split * RO + offs_o[:, None]) * RI + offs_c[None, :]) * T + t
    tl.store(dst, acc, mask=mask_o[:, None] & mask_c[None, :])


# ----------------------------------------------------------------------------- launchers


def _geom3(z: Tensor, k: Tensor, stride: list[int], pads: list[int], dilation: list[int]) -> dict:
    """Sizes, geometry and z strides padded to three spatial dims (leading unit dims)."""
    d = z.dim() - 2
    lead = 3 - d
    s = [1] * lead + list(z.shape[2:])
    ks = [1] * lead + list(k.shape[2:])
    st = [1] * lead + list(stride)
    dl = [1] * lead + list(dilation)
    lo = [0] * lead + list(pads[::2])
    hi = [0] * lead + list(pads[1::2])
    o = [(s[j] + lo[j] + hi[j] - dl[j] * (ks[j] - 1) - 1) // st[j] + 1 for j in range(3)]
    return {"S": s, "O": o, "K": ks, "st": st, "pd": lo, "dl": dl, "d": d}


def strides3(t: Tensor) -> list[int]:
    """(n, c, s1, s2, s3) strides with unit leading spatial dims for lower d."""
    return [t.stride(0), t.stride(1)] + [0] * (5 - t.dim()) + list(t.stride()[2:])


def _check(z: Tensor, k: Tensor, groups: int) -> tuple[int, int]:
    ro, ri = k.shape[0], k.shape[1]
    torch._check(z.shape[1] == groups * ri, lambda: f"z: expected {groups * ri} channels, got {z.shape[1]}")
    torch._check(k.dim() == z.dim(), lambda: f"K: expected {z.dim()} dims, got shape {tuple(k.shape)}")
    torch._check(max(ro, ri) <= MAX_RANK, lambda: f"ranks: expected <= {MAX_RANK}, got {(ro, ri)}")
    return ri, ro


def _common_args(geo: dict, groups: int, ri: int, ro: int) -> list[int]:
    return [groups, ri, ro, *geo["S"], *geo["O"], geo["K"][1], geo["K"][2], math.prod(geo["K"]),
            *geo["st"], *geo["pd"], *geo["dl"]]


# Positions per program. The interpreter's cost is per program and tap, not per element: large
# blocks keep CPU tests fast (tests pass a small ``block`` to cover multi-block tails).
_BLOCK = 256 if INTERPRET else 64


def _block(dtype: torch.dtype) -> int:
    """Positions per program: _BLOCK, halved for fp32 on a GPU (FMA dots; 64 spills on sm_80)."""
    return _BLOCK if INTERPRET or dtype != torch.float32 else _BLOCK // 2


def core_conv_forward(z: Tensor, k: Tensor, stride: list[int], pads: list[int], dilation: list[int], groups: int,
                      out: Tensor, block: int | None = None) -> Tensor:
    """Writes u = grouped conv(z, K) with zero padding into ``out`` (N, G r_out, *out_spatial) and returns it."""
    ri, ro = _check(z, k, groups)
    geo = _geom3(z, k, stride, pads, dilation)
    k = k.contiguous().to(z.dtype)
    bl = block or _block(z.dtype)
    grid = (triton.cdiv(math.prod(geo["O"]), bl) * z.shape[0] * groups,)
    if out.numel():
        _core_conv_fwd_kernel[grid](
            z, k, out, *_common_args(geo, groups, ri, ro), *strides3(z), *strides3(out),
            RIP=rank_pad(ri), ROP=rank_pad(ro), PREC=dot_precision(z.dtype), BL=bl,
        )
    return out


def core_conv_backward(
    du: Tensor, z: Tensor, k: Tensor, stride: list[int], pads: list[int], dilation: list[int], groups: int,
    dz: Tensor | None, need_dk: bool, split: int | None = None, block: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Writes dz into ``dz`` (when given); returns (dz, dK (r_out, r_in, *kernel) in K's dtype or None)."""
    ri, ro = _check(z, k, groups)
    geo = _geom3(z, k, stride, pads, dilation)
    kc = k.contiguous().to(z.dtype)
    bl = block or _block(z.dtype)
    args = _common_args(geo, groups, ri, ro)
    n, t = z.shape[0], math.prod(geo["K"])
    rip, rop, prec = rank_pad(ri), rank_pad(ro), dot_precision(z.dtype)
    if dz is not None and dz.numel():
        grid = (triton.cdiv(math.prod(geo["S"]), bl) * n * groups,)
        _core_conv_dz_kernel[grid](
            du, kc, dz, *args, *strides3(du), *strides3(dz), RIP=rip, ROP=rop, PREC=prec, BL=bl,
        )
    dk = None
    if need_dk:
        items = n * groups * triton.cdiv(math.prod(geo["O"]), bl)
        sp = split or split_for(items, t, z.device)
        part = torch.zeros((sp, ro, ri, t), dtype=torch.float32, device=z.device)
        if du.numel() and z.numel():
            _core_conv_dk_kernel[(t * sp,)](
                du, z, part, n * groups, *args[:12], sp, *args[12:], *strides3(du), *strides3(z),
                RIP=rip, ROP=rop, PREC=prec, BL=bl,
            )
        dk = part.sum(0).reshape(k.shape).to(k.dtype)
    return dz, dk


def out_shape(z: Tensor, k: Tensor, stride: list[int], pads: list[int], dilation: list[int], groups: int) -> list[int]:
    """(N, G r_out, *out_spatial) of the core conv."""
    geo = _geom3(z, k, stride, pads, dilation)
    return [z.shape[0], groups * k.shape[0], *geo["O"][3 - geo["d"]:]]


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("flora_triton::core_conv", mutates_args=())
def core_conv(z: Tensor, k: Tensor, stride: list[int], pads: list[int], dilation: list[int], groups: int) -> Tensor:
    """u (N, G r_out, *out) = conv(z (N, G r_in, *spatial), K (r_out, r_in, *kernel)) per group, zero padding
    ``pads`` (before, after per dim), in z's dtype and memory format."""
    out = alloc_like(out_shape(z, k, stride, pads, dilation, groups), z)
    return core_conv_forward(z, k, stride, pads, dilation, groups, out)


@fake(core_conv)
def _(z: Tensor, k: Tensor, stride: list[int], pads: list[int], dilation: list[int], groups: int) -> Tensor:
    return alloc_like(out_shape(z, k, stride, pads, dilation, groups), z)


@torch.library.custom_op("flora_triton::core_conv_bwd", mutates_args=())
def core_conv_bwd(
    du: Tensor, z: Tensor, k: Tensor, stride: list[int], pads: list[int], dilation: list[int], groups: int,
    need_dz: bool, need_dk: bool,
) -> tuple[Tensor, Tensor]:
    """(dz like z, dK like K) of ``core_conv``; an empty tensor where not asked."""
    dz, dk = core_conv_backward(du, z, k, stride, pads, dilation, groups, torch.empty_like(z) if need_dz else None, need_dk)
    return (dz if dz is not None else z.new_empty(0)), (dk if dk is not None else k.new_empty(0))


@fake(core_conv_bwd)
def _(du, z, k, stride, pads, dilation, groups, need_dz, need_dk):  # type: ignore[no-untyped-def]
    return (torch.empty_like(z) if need_dz else z.new_empty(0)), (torch.empty_like(k) if need_dk else k.new_empty(0))


def _core_conv_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    z, k, *geometry = inputs
    ctx.save_for_backward(z, k)
    ctx.geometry = geometry


def _core_conv_backward(ctx, du: Tensor):  # type: ignore[no-untyped-def]
    z, k = ctx.saved_tensors
    need_z, need_k = ctx.needs_input_grad[:2]
    dz, dk = core_conv_bwd(du, z, k, *ctx.geometry, need_z, need_k)
    return (dz if need_z else None, dk if need_k else None) + (None,) * 4


core_conv.register_autograd(_core_conv_backward, setup_context=_core_conv_setup)

"""Skinny channel GEMMs shared by the linear and conv adapters (kernels + launchers).

Every tensor is seen as X[n, c, l] (batch, channel, token) with arbitrary strides: a Linear's
(T, in) input is N = 1, C = in, L = T; a ConvNd's (N, C, *spatial) input flattens its spatial
dims into L (a view for NCHW, channels_last and most strided inputs). Channels come in G
groups of size Cg. A rank-r factor U is either shared by all groups (U: (Cg, r), the input
factor) or per output channel (U: (G * Cg, r), the output factor).

- ``project``: Z[n, g*r + a, l] = sum_c drop(X)[n, g*Cg + c, l] U[., a]     (shrink, dS, dU)
- ``expand``:  Y[n, g*Co + o, l] = base + mask * sum_a Z[n, g*r + a, l] U[., a] (expansion, dx)
- ``reduce``:  dU[., a] = sum over tokens (and groups if U is shared) of drop(X) Z  (dU, dB)

``drop`` is inverted dropout whose mask is recomputed from (seed, logical element index);
with groups = 1, ``project`` can also write the mask packed (1 bit per element) for ``reduce``
and the Linear dx GEMM to read instead.
Accumulation is fp32; rank r <= MAX_RANK sits padded in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    INTERPRET,
    MAX_RANK,
    block,
    dot_precision,
    fills_device,
    keep_mask,
    last_to_arrive,
    mask_words,
    pack_bits,
    rank_pad,
    split_for,
    tile_cap,
    unpack_bits,
)

# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["seed"])  # a random seed: no recompile when it is 1 or a multiple of 16
def _project_kernel(
    x_ptr, u_ptr, z_ptr, bits_ptr, L, C, Cg, R, G, W, sxn, sxc, sxl, szk, szn, szc, szl, sug, p, seed, NG, C_PER,
    DROPOUT: tl.constexpr, BITS: tl.constexpr, RP: tl.constexpr, PREC: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr,
):
    """z = drop(x) U per group; with BITS (G = 1, BC % 32 = 0) also bits[n, l, c // 32] |= keep << c % 32.

    NG = N * G. Split-K: program (k, n, g, token block) covers the group's channels [k C_PER, (k+1) C_PER)
    (C_PER a multiple of BC, so every mask word is written by one program) and writes its part of
    the sum at z + k szk (one split: C_PER >= Cg, k = 0)."""
    pid = tl.program_id(0).to(tl.int64)
    n_lb = tl.cdiv(L, BL)
    pid_l = pid % n_lb
    rest = pid // n_lb
    k = rest // NG
    pid_b = rest % NG
    n = pid_b // G
    g = pid_b % G
    offs_l = pid_l * BL + tl.arange(0, BL).to(tl.int64)
    offs_r = tl.arange(0, RP)
    mask_l = offs_l < L
    mask_r = offs_r < R
    acc = tl.zeros((BL, RP), dtype=tl.float32)
    for c0 in range(k * C_PER, tl.minimum(k * C_PER + C_PER, Cg), BC):
        offs_c = c0 + tl.arange(0, BC).to(tl.int64)
        mask_c = offs_c < Cg
        cc = g * Cg + offs_c
        m = mask_l[:, None] & mask_c[None, :]
        xt = tl.load(x_ptr + n * sxn + cc[None, :] * sxc + offs_l[:, None] * sxl, mask=m, other=0.0)
        if DROPOUT:
            keep = keep_mask(seed, (n * C + cc[None, :]) * L + offs_l[:, None], p)
            xt = tl.where(keep, xt.to(tl.float32) / (1.0 - p), 0.0).to(xt.dtype)
            if BITS:
                offs_w = c0 // 32 + tl.arange(0, BC // 32)
                tl.store(bits_ptr + (n * L + offs_l[:, None]) * W + offs_w[None, :], pack_bits(keep, BL, BC),
                         mask=mask_l[:, None] & (offs_w < W)[None, :])
        u = tl.load(u_ptr + g * sug + offs_c[:, None] * R + offs_r[None, :], mask=mask_c[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(xt, u.to(xt.dtype), acc, input_precision=PREC)
    dst = z_ptr + k * szk + n * szn + (g * R + offs_r[None, :]) * szc + offs_l[:, None] * szl
    tl.store(dst, acc.to(z_ptr.dtype.element_ty), mask=mask_l[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["seed"])  # a random seed: no recompile when it is 1 or a multiple of 16
def _expand_kernel(
    z_ptr, u_ptr, base_ptr, y_ptr, L, C, Co, R, G, szn, szc, szl, sbn, sbc, sbl, syn, syc, syl, sug, p, seed,
    HAS_BASE: tl.constexpr, DROPOUT: tl.constexpr, RP: tl.constexpr, PREC: tl.constexpr,
    BL: tl.constexpr, BO: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_lb = tl.cdiv(L, BL)
    n_ob = tl.cdiv(Co, BO)
    pid_b = pid // (n_lb * n_ob)
    rest = pid % (n_lb * n_ob)
    pid_o = rest // n_lb
    pid_l = rest % n_lb
    n = pid_b // G
    g = pid_b % G
    offs_l = pid_l * BL + tl.arange(0, BL).to(tl.int64)
    offs_o = pid_o * BO + tl.arange(0, BO).to(tl.int64)
    offs_r = tl.arange(0, RP)
    mask_l = offs_l < L
    mask_o = offs_o < Co
    mask_r = offs_r < R
    zt = tl.load(z_ptr + n * szn + (g * R + offs_r[None, :]) * szc + offs_l[:, None] * szl,
                 mask=mask_l[:, None] & mask_r[None, :], other=0.0)
    u = tl.load(u_ptr + g * sug + offs_o[:, None] * R + offs_r[None, :], mask=mask_o[:, None] & mask_r[None, :], other=0.0)
    acc = tl.dot(zt, tl.trans(u).to(zt.dtype), input_precision=PREC)  # (BL, BO)
    oc = g * Co + offs_o
    m = mask_l[:, None] & mask_o[None, :]
    if DROPOUT:
        keep = keep_mask(seed, (n * C + oc[None, :]) * L + offs_l[:, None], p)
        acc = tl.where(keep, acc / (1.0 - p), 0.0)
    if HAS_BASE:
        acc += tl.load(base_ptr + n * sbn + oc[None, :] * sbc + offs_l[:, None] * sbl, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + n * syn + oc[None, :] * syc + offs_l[:, None] * syl, acc.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["seed"])  # a random seed: no recompile when it is 1 or a multiple of 16
def _reduce_kernel(
    x_ptr, z_ptr, bits_ptr, part_ptr, out_ptr, count_ptr, N, L, C, Cg, R, G, W, sxn, sxc, sxl, szn, szc, szl, p,
    seed, SPLIT,
    SHARED: tl.constexpr, DROP: tl.constexpr, RP: tl.constexpr, PREC: tl.constexpr,
    BL: tl.constexpr, BC: tl.constexpr,
):
    """out[(g*Cg if not SHARED) + c, a] = sum over tokens drop(X)[n, g*Cg + c, l] Z[n, g*R + a, l],
    in out's dtype; the token loop is split SPLIT ways across programs.

    With SPLIT > 1 each program writes its fp32 partial part[split, row, a]; the last of a channel
    block's SPLIT programs to arrive (``last_to_arrive`` on that block's counter, zeroed before the
    launch) sums the block's partials in split order and writes out (deterministic). SPLIT = 1
    writes out directly. DROP: 0 no dropout, 1 the Philox mask of (seed, index), 2 the packed mask
    bits[n, l, c // 32] (G = 1)."""
    pid = tl.program_id(0)  # int32 block and item indices (no 64-bit division in the loop), int64 offsets
    split = pid % SPLIT
    rest = pid // SPLIT
    n_cb = tl.cdiv(Cg, BC)
    pid_c = rest % n_cb
    g_own = rest // n_cb  # this program's group when U is per output channel
    offs_c = pid_c * BC + tl.arange(0, BC).to(tl.int64)
    offs_r = tl.arange(0, RP)
    mask_c = offs_c < Cg
    mask_r = offs_r < R
    n_lb = tl.cdiv(L, BL)
    if SHARED:
        n_items = N * G * n_lb
    else:
        n_items = N * n_lb
    acc = tl.zeros((BC, RP), dtype=tl.float32)
    for it in range(split, n_items, SPLIT):
        lb = it % n_lb
        if SHARED:
            n = it // (n_lb * G)
            g = (it // n_lb) % G
        else:
            n = it // n_lb
            g = g_own
        n = n.to(tl.int64)
        offs_l = lb * BL + tl.arange(0, BL).to(tl.int64)
        mask_l = offs_l < L
        cc = g * Cg + offs_c
        xt = tl.load(x_ptr + n * sxn + cc[None, :] * sxc + offs_l[:, None] * sxl,
                     mask=mask_l[:, None] & mask_c[None, :], other=0.0)
        if DROP == 1:
            keep = keep_mask(seed, (n * C + cc[None, :]) * L + offs_l[:, None], p)
            xt = tl.where(keep, xt.to(tl.float32) / (1.0 - p), 0.0).to(xt.dtype)
        elif DROP == 2:
            keep = unpack_bits(bits_ptr, n * L + offs_l, cc, W, mask_l[:, None] & mask_c[None, :])
            xt = tl.where(keep, xt.to(tl.float32) / (1.0 - p), 0.0).to(xt.dtype)
        zt = tl.load(z_ptr + n * szn + (g * R + offs_r[None, :]) * szc + offs_l[:, None] * szl,
                     mask=mask_l[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(tl.trans(xt), zt.to(xt.dtype), acc, input_precision=PREC)
    row = offs_c if SHARED else g_own.to(tl.int64) * Cg + offs_c
    rows_total = Cg if SHARED else G * Cg
    m = mask_c[:, None] & mask_r[None, :]
    dst = out_ptr + row[:, None] * R + offs_r[None, :]
    if SPLIT == 1:
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m)
    else:
        part = part_ptr + row[:, None] * R + offs_r[None, :]
        tl.store(part + split * rows_total * R, acc, mask=m)
        last = last_to_arrive(count_ptr + rest, SPLIT)
        total = tl.zeros((BC, RP), dtype=tl.float32)
        for k in range(tl.where(last, SPLIT, 0)):  # a loop, not a branch: no spill on sm_80
            total += tl.load(part + k * rows_total * R, mask=m, other=0.0, cache_modifier=".cg")
        tl.store(dst, total.to(out_ptr.dtype.element_ty), mask=m & last)


# ----------------------------------------------------------------------------- launchers


def ncl(t: Tensor) -> tuple[Tensor, int, int, int, int]:
    """``t`` (N, C, *spatial) as an (N, C, L) strided view: (tensor, L, s_n, s_c, s_l).

    Copies only when the spatial dims cannot be flattened into one stride."""
    n, c = t.shape[0], t.shape[1]
    try:
        v = t.view(n, c, -1) if t.dim() != 3 else t
    except RuntimeError:
        t = t.contiguous()
        v = t.view(n, c, -1)
    return t, v.shape[2], v.stride(0), v.stride(1), v.stride(2)


def _check_rank(r: int) -> None:
    torch._check(r <= MAX_RANK, lambda: f"rank: expected <= {MAX_RANK}, got {r}")


def project(
    x: Tensor, u: Tensor, groups: int, z: Tensor, shared: bool, p: float = 0.0, seed: int = 0,
    bits: Tensor | None = None, partials: bool = False,
) -> Tensor:
    """Writes z (N, G*r, *spatial) = grouped 1x1 of drop(x) (N, G*Cg, *spatial) by U and returns it.

    u: (Cg, r) if ``shared`` else (G*Cg, r). z: any layout whose spatial dims flatten into one stride.
    ``bits`` (p > 0, groups = 1): an int32 (N, L, mask_words(C)) tensor that receives the keep mask,
    1 bit per element, for kernels that reuse it (``reduce(..., bits=)``, the Linear dx GEMM).
    ``partials``: where the token blocks alone make under two waves of programs (a Linear at
    small T), split the channel loop and return instead of z its fp32 split-K partials
    (split, N, G*r, L), summed over dim 0 by the consumer (z is then not written)."""
    _check_rank(u.shape[1])
    n, c = x.shape[0], x.shape[1]
    cg, r = c // groups, u.shape[1]
    torch._check(u.shape[0] == (cg if shared else c), lambda: f"U: expected {(cg if shared else c, r)}, got {tuple(u.shape)}")
    x, length, sxn, sxc, sxl = ncl(x)
    zv, _, szn, szc, szl = ncl(z)
    torch._check(zv is z, lambda: "z: expected a layout whose spatial dims flatten into one stride")
    if x.numel() == 0 or r == 0:
        return z.zero_()
    u = u.contiguous().to(x.dtype)
    bl, bc = block(length, 32 if INTERPRET else 64), block(cg, tile_cap(x.dtype))
    while bl > 16 and not fills_device(triton.cdiv(length, bl) * n * groups, x.device):
        bl //= 2  # under two waves (e.g. T = 8192 tokens: 128 programs of 64 on 132 SMs): smaller token blocks
    if bits is not None:
        _check_bits(bits, n, length, c, groups)
        torch._check(p > 0, lambda: "bits: only written with dropout (p > 0)")
        bc = max(bc, 32)
    programs = triton.cdiv(length, bl) * n * groups
    n_cb = triton.cdiv(cg, bc)
    c_per = triton.cdiv(n_cb, split_for(n_cb, programs, x.device) if partials else 1) * bc
    sp = triton.cdiv(cg, c_per)
    out, szk = z, 0
    if sp > 1:
        # (split, N, L, G*r) memory: each split's Linear S partial (T, r) is contiguous, like S
        out = torch.empty((sp, n, length, groups * r), dtype=torch.float32, device=x.device).transpose(2, 3)
        szk, szn, szc, szl = out.stride()
    _project_kernel[(programs * sp,)](
        x, u, out, bits if bits is not None else z, length, c, cg, r, groups, mask_words(c),
        sxn, sxc, sxl, szk, szn, szc, szl, 0 if shared else cg * r, float(p), int(seed), n * groups, c_per,
        DROPOUT=p > 0, BITS=bits is not None, RP=rank_pad(r), PREC=dot_precision(x.dtype), BL=bl, BC=bc,
    )
    return out


def _check_bits(bits: Tensor, n: int, length: int, c: int, groups: int) -> None:
    want = (n, length, mask_words(c))
    torch._check(groups == 1, lambda: f"bits: a packed dropout mask needs groups = 1, got {groups}")
    torch._check(bits.dtype == torch.int32 and tuple(bits.shape) == want and bits.is_contiguous(),
                 lambda: f"bits: expected a contiguous int32 tensor of shape {want}, got {bits.dtype} {tuple(bits.shape)}")


def expand(
    z: Tensor, u: Tensor, groups: int, y: Tensor, base: Tensor | None, shared: bool, p: float = 0.0, seed: int = 0
) -> Tensor:
    """Writes y (N, G*Co, *spatial) = base + mask * grouped 1x1 of z (N, G*r, *spatial) by U^T; returns y.

    u: (Co, r) if ``shared`` else (G*Co, r). The mask (p > 0) is the dropout mask of y's elements,
    as drawn by ``project`` for an input of y's shape."""
    r = u.shape[1]
    _check_rank(r)
    n, c = y.shape[0], y.shape[1]
    co = c // groups
    z, length, szn, szc, szl = ncl(z)
    yv, _, syn, syc, syl = ncl(y)
    torch._check(yv is y, lambda: "y: expected a layout whose spatial dims flatten into one stride")
    if base is not None:
        base, _, sbn, sbc, sbl = ncl(base)
    else:
        sbn = sbc = sbl = 0
    if y.numel() == 0:
        return y
    u = u.contiguous().to(z.dtype)
    bl, bo = block(length, 32 if INTERPRET else 64), block(co, 32 if INTERPRET else 64)
    grid = (triton.cdiv(length, bl) * triton.cdiv(co, bo) * n * groups,)
    _expand_kernel[grid](
        z, u, base if base is not None else y, y, length, c, co, r, groups, szn, szc, szl, sbn, sbc, sbl,
        syn, syc, syl, 0 if shared else co * r, float(p), int(seed),
        HAS_BASE=base is not None, DROPOUT=p > 0, RP=rank_pad(r), PREC=dot_precision(z.dtype), BL=bl, BO=bo,
    )
    return y


def reduce(
    x: Tensor, z: Tensor, groups: int, shared: bool, p: float = 0.0, seed: int = 0, split: int | None = None,
    bits: Tensor | None = None, dtype: torch.dtype | None = None, counters: Tensor | None = None,
) -> Tensor:
    """dU = sum over tokens of drop(x)[n, g*Cg + c, l] z[n, g*r + a, l], split-K partials summed in
    the same launch (``_reduce_kernel``).

    x: (N, G*Cg, *spatial), z: (N, G*r, *spatial). Returns (Cg, r) summed over groups if ``shared``,
    else (G*Cg, r), in ``dtype`` (default x's). The mask (p > 0) is read from ``bits`` (see
    ``project``) when given, else recomputed from ``seed``. ``counters``: int32, at least one per
    channel block, zeroed by an earlier launch on the stream (default: allocated zeroed here)."""
    n, c = x.shape[0], x.shape[1]
    cg, r = c // groups, z.shape[1] // groups
    _check_rank(r)
    x, length, sxn, sxc, sxl = ncl(x)
    z, _, szn, szc, szl = ncl(z)
    rows = cg if shared else c
    out = torch.empty((rows, r), dtype=dtype or x.dtype, device=x.device)
    if x.numel() == 0 or r == 0:
        return out.zero_()
    bl, bc = block(length, 32 if INTERPRET else 64), _reduce_block(cg, x.dtype)
    programs = reduce_programs(x, groups, shared)
    items = (n * groups if shared else n) * triton.cdiv(length, bl)
    sp = split or split_for(items, programs, x.device)
    part = torch.empty((sp, rows, r) if sp > 1 else (0,), dtype=torch.float32, device=x.device)
    if sp > 1 and counters is None:
        counters = torch.zeros((programs,), dtype=torch.int32, device=x.device)
    torch._check(sp == 1 or counters.numel() >= programs,  # type: ignore[union-attr]
                 lambda: f"reduce: expected >= {programs} counters, got {counters.numel()}")  # type: ignore[union-attr]
    if bits is not None:
        _check_bits(bits, n, length, c, groups)
    drop = 0 if p <= 0 else (2 if bits is not None else 1)
    _reduce_kernel[(programs * sp,)](
        x, z, bits if bits is not None else part, part, out, counters if counters is not None else out,
        n, length, c, cg, r, groups, mask_words(c), sxn, sxc, sxl, szn, szc, szl, float(p), int(seed), sp,
        SHARED=shared, DROP=drop, RP=rank_pad(r), PREC=dot_precision(x.dtype), BL=bl, BC=bc,
    )
    return out


def reduce_programs(x: Tensor, groups: int, shared: bool) -> int:
    """The channel blocks of ``reduce`` on x (N, G*Cg, *spatial): the counters it needs."""
    cg = x.shape[1] // groups
    return triton.cdiv(cg, _reduce_block(cg, x.dtype)) * (1 if shared else groups)


def _reduce_block(cg: int, dtype: torch.dtype) -> int:
    return block(cg, tile_cap(dtype))

"""FLoRA Linear in Triton: the factorized path (fused shrink / GEMM-with-epilogue / extended-K dx).
The merged path is the reconstruct kernel + torch's matmul, composed in ``backends.merged``.

Factorized, with B = s U_out G (out, r_in) never stored: the kernels form the tiles they need
from the core G (r_out, r_in) and U_out (out, r_out):

    forward:  S = drop(x) U_in                          (T, r_in)   channel_gemm.project (+ mask bits)
              y = x W^T + bias + S B^T                  one GEMM, the rank part as an extra K step,
                                                        B^T tile = s G^T U_out^T[:, tile] per output tile
    backward: dS = dy B, dB = dy^T S, dbias = sum_t dy  one pass over dy (ds_db), split-K partials
              dU_out = s dB G^T, dG = s U_out^T dB      + one finish launch summing the partials
              dx = dy W + mask * (dS U_in^T)             one GEMM over an extended K loop
              dU_in = drop(x)^T dS                       token reduction, partials summed in-kernel

A training step is six launches and no torch op (allocations aside). At small T (under two
waves of token blocks) the shrink splits the input features; the forward GEMM sums those fp32
partials in its rank part and writes S. Every split-K reduction is deterministic (fixed order,
no float atomics): the reducing program is picked by an int32 arrival counter
(``_common.last_to_arrive``), zeroed by an earlier launch of the same step.

Dropout: the shrink draws the Philox mask from a seed once and writes it packed, 1 bit per
element (T x ceil(in / 32) int32 words, saved for the backward); the dx GEMM and dU_in read
the bits. The base weight is frozen: the op returns no weight gradient (the backend refuses a
call whose weight requires grad); the bias gradient comes from the same pass over dy as dS.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..oplib import fake
from . import channel_gemm as cg
from ._common import (
    INTERPRET,
    MAX_RANK,
    dot_precision,
    last_to_arrive,
    mask_words,
    new_seed,
    rank_pad,
    split_for,
    zero_counters,
)
from .gemm_tma import gemm_tma, grouped_tile, rank_part, unsupported_reason

# ----------------------------------------------------------------------------- kernels


# (BM, BN, BK, warps, stages): tensor-core tiles for fp16/bf16; exact-fp32 (FMA) tiles for fp32
_HALF_CONFIGS = ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4))
_FP32_CONFIGS = ((64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3))
_INTERPRET_CONFIG = triton.Config({"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 4}, num_warps=4)


def _config(bm: int, bn: int, bk: int, w: int, s: int) -> triton.Config:
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)


def gemm_configs(dtype: torch.dtype, arch: int) -> list[triton.Config]:
    """The autotune configs of ``_gemm_ext_kernel`` for operands of ``dtype`` on compute
    capability ``arch`` (major * 10 + minor); all of them compile without spills at the
    benchmark shapes (``compile_check --all-configs``)."""
    if INTERPRET:
        return [_INTERPRET_CONFIG]
    if dtype == torch.float32:
        return [_CONFIGS[c] for c in _FP32_CONFIGS]
    return [_CONFIGS[c] for c in _HALF_CONFIGS if arch >= 90 or c[:2] not in ((128, 256), (256, 128))]


_CONFIGS = {c: _config(*c) for c in _HALF_CONFIGS + _FP32_CONFIGS}


def _device_arch(t: object) -> int:
    dev = getattr(t, "device", None)
    if dev is None or dev.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(dev)
    return 10 * major + minor


def _prune_gemm(configs: list[triton.Config], nargs: dict, **kwargs: object) -> list[triton.Config]:
    keep = gemm_configs(nargs["a_ptr"].dtype, _device_arch(nargs["a_ptr"]))
    return [c for c in configs if c in keep]


def token_bucket(m: int) -> int:
    """The autotune bucket of a token count: the next power of two (at least 16), so that every
    sequence length in (2^(k-1), 2^k] shares one tuned config (and CUDA graphs never re-tune)."""
    return max(16, triton.next_power_of_2(int(m)))


def operand_layout(a: Tensor, b: Tensor) -> int:
    """Autotune key of the operand layout: 2 * (A is K-contiguous) + (B is K-contiguous).

    The forward GEMM (x, W^T: both K-contiguous) is 3; the dx GEMM (dy, W: B N-contiguous) is 2."""
    return 2 * int(a.stride(1) == 1) + int(b.stride(0) == 1)


@triton.autotune(
    configs=[_INTERPRET_CONFIG] if INTERPRET else list(_CONFIGS.values()),
    key=["M_BUCKET", "N", "K", "LAYOUT", "RP", "QP", "FOLD", "SUM_A2", "HAS_BIAS", "DROPOUT"],
    prune_configs_by={"early_config_prune": _prune_gemm},
)
@triton.jit
def _gemm_ext_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, c_ptr, a2o_ptr, bias_ptr, bits_ptr, y_ptr, M, N, K, R, Q, A2_SPLIT, M_BUCKET, LAYOUT,
    sam, sak, sbk, sbn, sa2k, sa2m, sa2r, sb2r, sb2n, scr, scq, sym, syn, sbits, p, scale,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, RP: tl.constexpr, QP: tl.constexpr, FOLD: tl.constexpr,
    SUM_A2: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[m, n] = keep[m, n] / (1 - p) * sum_r A2[m, r] B2[r, n] + sum_k A[m, k] B[k, n] + bias[n].

    keep (DROPOUT) is bit n % 32 of the int32 word bits[m, n // 32]. FOLD: B2 = scale * C V
    formed per tile from C (R, Q) and V (Q, N); SUM_A2: A2 summed from A2_SPLIT fp32 split-K
    partials and written to a2o by the first column tile's programs (``rank_part``). The rank part is computed
    first and masked into the accumulator, so one (BM, BN) accumulator is live at a time.
    M_BUCKET and LAYOUT only key the autotuner."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    offs_m = pid_m.to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    offs_n = pid_n.to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # the rank-R extension of the K loop, first
    acc = rank_part(a2_ptr, b2_ptr, c_ptr, bits_ptr, a2o_ptr, offs_m, offs_n, mask_m, mask_n, sa2k, sa2m, sa2r,
                    sb2r, sb2n, scr, scq, sbits, p, scale, R, Q, A2_SPLIT, pid_n == 0, RP, QP, FOLD,
                    SUM_A2, DROPOUT, PREC)
    # the main K loop: rows and columns past the edge wrap (their results are not stored), so
    # only the K tail is masked; pointers advance by one K block per step
    offs_am = tl.max_contiguous(tl.multiple_of(offs_m % M, BM), BM)
    offs_bn = tl.max_contiguous(tl.multiple_of(offs_n % N, BN), BN)
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + offs_am[:, None] * sam + offs_k[None, :] * sak
    b_ptrs = b_ptr + offs_k[:, None] * sbk + offs_bn[None, :] * sbn
    for k0 in range(0, K, BK):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k0, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BK * sak
        b_ptrs += BK * sbk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * sym + offs_n[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _b_tile(u_ptr, g_ptr, offs_n, mask_n, offs_q, mask_q, offs_r, mask_r, sun, suq, sgq, sgr, scale, PREC: tl.constexpr):
    """B[n, :] = scale * U_out[n, :] G for a channel block: (BC, QP) @ (QP, RP) in fp32."""
    u = tl.load(u_ptr + offs_n[:, None] * sun + offs_q[None, :] * suq, mask=mask_n[:, None] & mask_q[None, :], other=0.0)
    g = tl.load(g_ptr + offs_q[:, None] * sgq + offs_r[None, :] * sgr, mask=mask_q[:, None] & mask_r[None, :], other=0.0)
    return tl.dot(u.to(tl.float32), g.to(tl.float32), input_precision=PREC) * scale


@triton.jit
def _ds_db_kernel(
    dy_ptr, u_ptr, g_ptr, s_ptr, ds_ptr, ds_part_ptr, db_part_ptr, dbias_ptr, count_ptr, T, N, R, Q, NCOUNT,
    sdt, sdn, sun, suq, sgq, sgr, sst, ssr, scale, T_PER, N_PER, TSPLIT,
    DB: tl.constexpr, DBIAS: tl.constexpr, DS_DIRECT: tl.constexpr, RP: tl.constexpr, QP: tl.constexpr,
    PREC: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr,
):
    """One pass over dy (T, N) for dS = dy B, dB = dy^T S and dbias = sum_t dy, where B =
    scale U_out G (N, R) is formed per channel block (``_b_tile``) from U_out (N, Q), G (Q, R).

    Program (i, j) covers tokens [i T_PER, (i+1) T_PER) and channels [j N_PER, (j+1) N_PER).
    dS: its running sum over the program's channel blocks is fp32 in ds_part[j] (T, R); with
    DS_DIRECT (one channel split) the last block writes dS into ds (T, R, ds's dtype) instead.
    DB: db_part[i, n, a] = sum over its tokens of dy[t, n] S[t, a] (fp32; with one token split,
    dB itself). DBIAS: dbias[i, n] = sum over its tokens of dy[t, n], in dbias's dtype (the
    final (N,) gradient with one token split, else fp32 partials). Program 0 zeroes the NCOUNT
    counters at count_ptr for the launches that follow (``last_to_arrive``)."""
    pid = tl.program_id(0)
    if pid == 0:
        zero_counters(count_ptr, NCOUNT)
    i = pid % TSPLIT
    j = pid // TSPLIT
    t_lo = i * T_PER
    t_hi = tl.minimum(t_lo + T_PER, T)
    n_lo = j * N_PER
    n_hi = tl.minimum(n_lo + N_PER, N)
    offs_r = tl.arange(0, RP)
    mask_r = offs_r < R
    offs_q = tl.arange(0, QP)
    mask_q = offs_q < Q
    for n0 in range(n_lo, n_hi, BC):
        offs_n = (n0 + tl.arange(0, BC)).to(tl.int64)
        mask_n = offs_n < n_hi
        bt = _b_tile(u_ptr, g_ptr, offs_n, mask_n, offs_q, mask_q, offs_r, mask_r, sun, suq, sgq, sgr, scale, PREC)
        db = tl.zeros((BC, RP), dtype=tl.float32)
        dbias = tl.zeros((BC,), dtype=tl.float32)
        for t0 in range(t_lo, t_hi, BL):
            offs_t = (t0 + tl.arange(0, BL)).to(tl.int64)
            mask_t = offs_t < t_hi
            dyt = tl.load(dy_ptr + offs_t[:, None] * sdt + offs_n[None, :] * sdn, mask=mask_t[:, None] & mask_n[None, :], other=0.0)
            if DB:
                st = tl.load(s_ptr + offs_t[:, None] * sst + offs_r[None, :] * ssr, mask=mask_t[:, None] & mask_r[None, :], other=0.0)
                db = tl.dot(tl.trans(dyt), st.to(dyt.dtype), db, input_precision=PREC)
            if DBIAS:
                dbias += tl.sum(dyt.to(tl.float32), axis=0)
            ds = tl.dot(dyt, bt.to(dyt.dtype), input_precision=PREC)
            part = ds_part_ptr + (j * T + offs_t)[:, None] * R + offs_r[None, :]
            m = mask_t[:, None] & mask_r[None, :]
            ds += tl.load(part, mask=m & (n0 > n_lo), other=0.0)  # the previous channel blocks' sum
            if DS_DIRECT:
                last = n0 + BC >= n_hi
                tl.store(ds_ptr + offs_t[:, None] * R + offs_r[None, :], ds.to(ds_ptr.dtype.element_ty), mask=m & last)
                tl.store(part, ds, mask=m & (n0 + BC < n_hi))
            else:
                tl.store(part, ds, mask=m)
        tl.debug_barrier()  # makes this block's dS stores visible to the threads that load them next
        if DB:
            tl.store(db_part_ptr + (i * N + offs_n)[:, None] * R + offs_r[None, :], db, mask=mask_n[:, None] & mask_r[None, :])
        if DBIAS:
            tl.store(dbias_ptr + i * N + offs_n, dbias.to(dbias_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _ds_db_finish_kernel(
    ds_part_ptr, ds_ptr, db_part_ptr, dbias_part_ptr, dbias_ptr, u_ptr, g_ptr, du_ptr, dg_part_ptr, dg_ptr, count_ptr,
    T, N, R, Q, NSPLIT, TSPLIT, N_TB, N_CB, sun, suq, sgq, sgr, sdun, sduq, sdgq, sdgr, scale,
    DS: tl.constexpr, DB: tl.constexpr, DBIAS: tl.constexpr, DG_DIRECT: tl.constexpr, RP: tl.constexpr,
    QP: tl.constexpr, PREC: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr,
):
    """The end of ``_ds_db_kernel``'s work: split-K partials summed in a fixed order and cast.

    Programs [0, N_TB) (DS): dS[t-block] = sum_j ds_part[j, t-block] (NSPLIT channel splits).
    Programs [N_TB, N_TB + N_CB), one per channel block: DB: dB = sum_i db_part[i, block]
    (TSPLIT token splits), dU_out[block] = scale dB G^T and this block's share of
    dG = scale U_out^T dB, an fp32 partial dg_part[block] (Q, R); the last of the N_CB programs
    to arrive (``last_to_arrive`` on count_ptr, zeroed by ``_ds_db_kernel``) sums the partials
    in block order and writes dG (deterministic; DG_DIRECT, one block: written directly).
    DBIAS: dbias[block] = sum_i dbias_part[i, block].

    Why an arrival counter for dG: a second launch for a 64 KiB reduction would cost more than
    this whole kernel (a launch is ~3-5 us, the kernel's floor ~4.5 us at T = 8192, out = 4096),
    float atomics would make dG depend on the arrival order, and one program summing all of dB
    would read out x r fp32 partials x TSPLIT on one SM. The counter needs no memset: the
    preceding ds_db launch zeroes it."""
    pid = tl.program_id(0)
    offs_r = tl.arange(0, RP)
    mask_r = offs_r < R
    offs_q = tl.arange(0, QP)
    mask_q = offs_q < Q
    if pid < N_TB:
        offs_t = (pid * BL + tl.arange(0, BL)).to(tl.int64)
        m = (offs_t < T)[:, None] & mask_r[None, :]
        ds = tl.zeros((BL, RP), dtype=tl.float32)
        for j in range(NSPLIT):
            ds += tl.load(ds_part_ptr + (j * T + offs_t)[:, None] * R + offs_r[None, :], mask=m, other=0.0)
        tl.store(ds_ptr + offs_t[:, None] * R + offs_r[None, :], ds.to(ds_ptr.dtype.element_ty), mask=m)
    else:
        cb = pid - N_TB
        offs_n = (cb * BC + tl.arange(0, BC)).to(tl.int64)
        mask_n = offs_n < N
        if DB:
            m = mask_n[:, None] & mask_r[None, :]
            db = tl.zeros((BC, RP), dtype=tl.float32)
            for i in range(TSPLIT):
                db += tl.load(db_part_ptr + (i * N + offs_n)[:, None] * R + offs_r[None, :], mask=m, other=0.0)
            g = tl.load(g_ptr + offs_q[:, None] * sgq + offs_r[None, :] * sgr, mask=mask_q[:, None] & mask_r[None, :], other=0.0)
            du = tl.dot(db, tl.trans(g.to(tl.float32)), input_precision=PREC) * scale  # (BC, QP)
            tl.store(du_ptr + offs_n[:, None] * sdun + offs_q[None, :] * sduq, du.to(du_ptr.dtype.element_ty),
                     mask=mask_n[:, None] & mask_q[None, :])
            u = tl.load(u_ptr + offs_n[:, None] * sun + offs_q[None, :] * suq, mask=mask_n[:, None] & mask_q[None, :], other=0.0)
            dg = tl.dot(tl.trans(u.to(tl.float32)), db, input_precision=PREC) * scale  # (QP, RP)
            mg = mask_q[:, None] & mask_r[None, :]
            dg_dst = dg_ptr + offs_q[:, None] * sdgq + offs_r[None, :] * sdgr
            if DG_DIRECT:
                tl.store(dg_dst, dg.to(dg_ptr.dtype.element_ty), mask=mg)
            else:
                part = dg_part_ptr + offs_q[:, None] * RP + offs_r[None, :]
                tl.store(part + cb * QP * RP, dg)
                last = last_to_arrive(count_ptr, N_CB)
                total = tl.zeros((QP, RP), dtype=tl.float32)
                for k in range(tl.where(last, N_CB, 0)):  # a loop, not a branch: no spill on sm_80
                    total += tl.load(part + k * QP * RP, cache_modifier=".cg")
                tl.store(dg_dst, total.to(dg_ptr.dtype.element_ty), mask=mg & last)
        if DBIAS:
            dbias = tl.zeros((BC,), dtype=tl.float32)
            for i in range(TSPLIT):
                dbias += tl.load(dbias_part_ptr + i * N + offs_n, mask=mask_n, other=0.0)
            tl.store(dbias_ptr + offs_n, dbias.to(dbias_ptr.dtype.element_ty), mask=mask_n)


_gemm_ext_kernel.configs_for = gemm_configs  # compile_check compiles what the pruning keeps per target


# ----------------------------------------------------------------------------- launchers


#: The GEMM variants of ``gemm_ext``, the dispatcher's default first: the persistent TMA kernel
#: (sm_90+), the tiled kernel (any CUDA GPU), and cuBLAS (torch.addmm) plus a second pass adding
#: the rank part. Which one runs is the dispatcher's choice (``TritonBackend.variants``).
GEMM_VARIANTS = ("tma", "tiled", "cublas")


def gemm_ext(
    a: Tensor, b: Tensor, a2: Tensor, b2: Tensor, bias: Tensor | None, p: float = 0.0, bits: Tensor | None = None,
    variant: str = "tiled", core: Tensor | None = None, scale: float = 1.0, a2_out: Tensor | None = None,
) -> Tensor:
    """y = a b + mask * (A2 B2) + bias: a (M, K), b (K, N), any strides. A2 = a2 (M, R), or with
    ``a2_out`` (M, R) the sum of a2's fp32 split-K partials (split, M, R) (``shrink`` at small T),
    which the kernels also write to a2_out (strides: the partials' last two). B2 = b2 (R, N), or with ``core`` (R, Q):
    B2 = scale * core b2 for b2 (Q, N), formed per output tile by the Triton kernels (the
    forward's B^T = s G^T U_out^T from the core and U_out).

    The mask (p > 0) is read from ``bits``, an int32 (M, mask_words(N)) packed keep mask (as
    ``shrink`` writes it). Returns (M, N) in a's dtype. ``variant``: one of GEMM_VARIANTS; a
    "tma" request whose operands TMA cannot address runs "tiled" (with a warning giving the reason)."""
    m, k = a.shape
    n, r = b.shape[1], a2.shape[-1]
    q = core.shape[1] if core is not None else r
    torch._check(a2.dim() == (3 if a2_out is not None else 2)
                 and (a2_out is None or (tuple(a2_out.shape) == (m, r) and a2_out.stride() == a2.stride()[1:])),
                 lambda: f"gemm_ext: expected a2 (M, R), or (split, M, R) partials with a2_out (M, R) of their strides, "
                 f"got {tuple(a2.shape)}")
    torch._check(b.shape[0] == k and a2.shape[-2] == m and tuple(b2.shape) == (q, n)
                 and (core is None or core.shape[0] == r),
                 lambda: f"gemm_ext: shapes {tuple(a.shape)} {tuple(b.shape)} {tuple(a2.shape)} {tuple(b2.shape)} "
                 f"(core {None if core is None else tuple(core.shape)}) do not chain")
    torch._check(a.dtype == b.dtype, lambda: f"expected x and weight of one dtype, got {a.dtype} and {b.dtype}")
    torch._check(max(r, q) <= MAX_RANK, lambda: f"rank: expected <= {MAX_RANK}, got {max(r, q)}")
    torch._check(p <= 0 or bits is not None, lambda: "gemm_ext: dropout (p > 0) needs the packed mask bits")
    if bits is not None:
        torch._check(bits.dtype == torch.int32 and tuple(bits.shape) == (m, mask_words(n)) and bits.stride(1) == 1,
                     lambda: f"bits: expected int32 {(m, mask_words(n))} with unit column stride, got {bits.dtype} {tuple(bits.shape)}")
    if m * n == 0:
        if a2_out is not None:
            a2_out.copy_(a2.sum(0))
        return torch.empty((m, n), dtype=a.dtype, device=a.device)
    a2 = a2 if a2_out is not None else a2.to(a.dtype)
    if variant not in GEMM_VARIANTS:
        raise ValueError(f"gemm variant: expected one of {GEMM_VARIANTS}, got {variant!r}")
    args = (a, b, a2, b2, bias, p, bits if p > 0 else None, core, float(scale), a2_out)
    if variant == "tma":
        tma_why = unsupported_reason(a, b, n)
        if tma_why is not None:
            warnings.warn(f"gemm_ext: the TMA kernel does not apply ({tma_why}); using the tiled kernel", stacklevel=2)
            variant = "tiled"
    return _GEMMS[variant](*args)


def _gemm_tiled(a: Tensor, b: Tensor, a2: Tensor, b2: Tensor, bias: Tensor | None, p: float, bits: Tensor | None,
                core: Tensor | None = None, scale: float = 1.0, a2_out: Tensor | None = None) -> Tensor:
    """``gemm_ext`` through ``_gemm_ext_kernel`` (one program per output tile)."""
    m, k = a.shape
    n, r = b.shape[1], a2.shape[-1]
    q = core.shape[1] if core is not None else r
    y = torch.empty((m, n), dtype=a.dtype, device=a.device)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

    _gemm_ext_kernel[grid](
        a, b, a2, b2, core if core is not None else y, a2_out if a2_out is not None else y,
        bias if bias is not None else y, bits if bits is not None else y, y,
        m, n, k, r, q, a2.shape[0] if a2_out is not None else 1, token_bucket(m), operand_layout(a, b),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), *(a2.stride() if a2.dim() == 3 else (0, *a2.stride())),
        b2.stride(0), b2.stride(1), *(core.stride() if core is not None else (0, 0)),
        y.stride(0), y.stride(1),
        bits.stride(0) if bits is not None else 0, float(p), float(scale),
        HAS_BIAS=bias is not None, DROPOUT=p > 0, RP=rank_pad(r), QP=rank_pad(q), FOLD=core is not None,
        SUM_A2=a2_out is not None, PREC=dot_precision(a.dtype),
    )
    return y


def _gemm_tma(a: Tensor, b: Tensor, a2: Tensor, b2: Tensor, bias: Tensor | None, p: float, bits: Tensor | None,
              core: Tensor | None = None, scale: float = 1.0, a2_out: Tensor | None = None) -> Tensor:
    """``gemm_ext`` through the persistent TMA kernel (``gemm_tma``)."""
    return gemm_tma(a, b, a2, b2, bias, p, bits, token_bucket(a.shape[0]), rank_pad(a2.shape[-1]), dot_precision(a.dtype),
                    core=core, scale=scale, a2_out=a2_out)


def _gemm_cublas(a: Tensor, b: Tensor, a2: Tensor, b2: Tensor, bias: Tensor | None, p: float, bits: Tensor | None,
                 core: Tensor | None = None, scale: float = 1.0, a2_out: Tensor | None = None) -> Tensor:
    """``gemm_ext`` as torch.addmm (cuBLAS) plus a second pass over y adding the rank part
    (A2 summed and B2 = scale * core b2 formed by torch first where given so)."""
    if a2_out is not None:
        a2 = a2_out.copy_(a2.sum(0))
    b2 = b2.to(a.dtype) if core is None else (core.to(a.dtype) @ b2.to(a.dtype)).mul_(scale)
    y = torch.addmm(bias.to(a.dtype), a, b) if bias is not None else a @ b
    if bits is None:
        return y.addmm_(a2, b2)
    # byte j // 8 of a (little-endian) int32 word holds its bits j: channel 8 * byte + bit
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    keep = ((bits.view(torch.uint8)[:, :, None] >> shifts) & 1).flatten(1)[:, : y.shape[1]]
    return y.add_(torch.where(keep != 0, a2 @ b2, 0.0), alpha=1.0 / (1.0 - p))


_GEMMS = {"tiled": _gemm_tiled, "tma": _gemm_tma, "cublas": _gemm_cublas}


def ds_db(
    dy: Tensor, s: Tensor, u_out: Tensor, core: Tensor, scale: float, need_db: bool,
    dbias_dtype: torch.dtype | None = None, split_t: int | None = None, split_n: int | None = None,
    counters: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The gradients that need dy (T, out) of ``y = ... + S B^T + bias`` with B = scale U_out G:
    (dS = dy B (T, r_in) in dy's dtype, dU_out = scale dB G^T (out, r_out) in u_out's dtype,
    dG = scale U_out^T dB (r_out, r_in) in core's dtype, with dB = dy^T S, or None unless
    ``need_db``; dbias = sum_t dy (out,) in ``dbias_dtype``, or None). s (T, r_in), u_out
    (out, r_out), core G (r_out, r_in).

    One pass over dy (``_ds_db_kernel``, B formed per channel block), its token and channel loops
    split ``split_t`` x ``split_n`` ways (default: about two waves of programs, at most 16 channel
    splits), then one ``_ds_db_finish_kernel`` launch summing the fp32 partials and forming dU_out
    and dG. With one channel split dS, with one token split dbias, is written directly (no
    partials); the finish launch is skipped when nothing is left for it. ``counters``: an int32
    tensor the first launch zeroes (element 0 serves dG's reduction; the rest, launches after)."""
    t, n = dy.shape
    r, q = s.shape[1], u_out.shape[1]
    torch._check(tuple(u_out.shape) == (n, q) and tuple(core.shape) == (q, r) and s.shape[0] == t,
                 lambda: f"ds_db: expected u_out ({n}, r_out), core (r_out, {s.shape[1]}) and s ({t}, r_in), got "
                 f"{tuple(u_out.shape)}, {tuple(core.shape)} and {tuple(s.shape)}")
    torch._check(max(r, q) <= MAX_RANK, lambda: f"rank: expected <= {MAX_RANK}, got {max(r, q)}")
    dev = dy.device
    ds = torch.empty((t, r), dtype=dy.dtype, device=dev)
    du_out = torch.empty(u_out.shape, dtype=u_out.dtype, device=dev) if need_db else None
    dg = torch.empty(core.shape, dtype=core.dtype, device=dev) if need_db else None
    dbias = torch.empty((n,), dtype=dbias_dtype, device=dev) if dbias_dtype is not None else None
    if dy.numel() == 0:
        return ds.zero_(), *(v.zero_() if v is not None else None for v in (du_out, dg, dbias))  # type: ignore[return-value]
    counters = counters if counters is not None else torch.empty((1,), dtype=torch.int32, device=dev)
    bl, bc = (32, 32) if INTERPRET or dy.dtype == torch.float32 else (64, 64)  # fp32: FMA dots, smaller tiles
    n_cb, n_tb = triton.cdiv(n, bc), triton.cdiv(t, bl)
    n_per = triton.cdiv(n_cb, split_n or min(n_cb, 16)) * bc
    sn = triton.cdiv(n, n_per)
    t_per = triton.cdiv(n_tb, split_t or split_for(n_tb, sn, dev)) * bl
    st = triton.cdiv(t, t_per)
    f32 = torch.float32
    ds_part = torch.empty((sn if sn > 1 else int(n > bc), t, r), dtype=f32, device=dev)  # one split: the running sum
    db_part = torch.empty((st, n, r) if need_db else (0,), dtype=f32, device=dev)
    dbias_part = dbias if dbias is None or st == 1 else torch.empty((st, n), dtype=f32, device=dev)
    rp, qp, prec = rank_pad(r), rank_pad(q), dot_precision(dy.dtype)
    _ds_db_kernel[(st * sn,)](
        dy, u_out, core, s, ds, ds_part, db_part, dbias_part if dbias_part is not None else ds, counters,
        t, n, r, q, counters.numel(), dy.stride(0), dy.stride(1), u_out.stride(0), u_out.stride(1),
        core.stride(0), core.stride(1), s.stride(0), s.stride(1), float(scale), t_per, n_per, st,
        DB=need_db, DBIAS=dbias is not None, DS_DIRECT=sn == 1, RP=rp, QP=qp, PREC=prec, BL=bl, BC=bc,
    )
    fin_bias = dbias is not None and st > 1
    n_tbf = triton.cdiv(t, bl) if sn > 1 else 0
    n_cbf = n_cb if need_db or fin_bias else 0
    if n_tbf + n_cbf:
        dg_part = torch.empty((n_cb, qp, rp) if need_db and n_cb > 1 else (0,), dtype=f32, device=dev)
        dummy = ds
        _ds_db_finish_kernel[(n_tbf + n_cbf,)](
            ds_part, ds, db_part, dbias_part if fin_bias else dummy, dbias if fin_bias else dummy, u_out, core,
            du_out if need_db else dummy, dg_part, dg if need_db else dummy, counters,
            t, n, r, q, sn, st, n_tbf, n_cbf, u_out.stride(0), u_out.stride(1), core.stride(0), core.stride(1),
            *(du_out.stride() if du_out is not None else (0, 0)), *(dg.stride() if dg is not None else (0, 0)),
            float(scale), DS=sn > 1, DB=need_db, DBIAS=fin_bias, DG_DIRECT=n_cb == 1, RP=rp, QP=qp, PREC=prec,
            BL=bl, BC=bc,
        )
    return ds, du_out, dg, dbias


def _tokens(t: Tensor) -> Tensor:
    """(T, C) as the (1, C, T) channel view the channel GEMMs take."""
    return t.t().unsqueeze(0)


def shrink(x: Tensor, u: Tensor, p: float = 0.0, seed: int = 0, bits: Tensor | None = None,
           partials: bool = False) -> Tensor:
    """S = drop(x) U: x (T, in), u (in, r) -> (T, r) in x's dtype. ``bits`` (p > 0): an int32
    (T, mask_words(in)) tensor that receives the keep mask, 1 bit per element. ``partials``:
    where T alone gives under two waves of programs, the input features are split and the fp32
    split-K partials (split, T, r) are returned instead (their sum is S; ``gemm_ext(a2_out=)``)."""
    s = torch.empty((x.shape[0], u.shape[1]), dtype=x.dtype, device=x.device)
    z = _tokens(s)
    out = cg.project(_tokens(x), u, 1, z, True, p, seed, bits.unsqueeze(0) if bits is not None else None,
                     partials=partials)
    return s if out is z else out[:, 0].transpose(1, 2)


def _bits_shape(x: Tensor, p: float) -> tuple[int, ...]:
    return (x.shape[0], mask_words(x.shape[1])) if p > 0 else (0,)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("flora_triton::linear_fwd", mutates_args=())
def linear_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, u_in: Tensor, core: Tensor, u_out: Tensor, scale: float,
    p: float, seed: int, gemm: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, S, bits): S = drop(x) U_in (T, r_in), y = x W^T + bias + S (s G^T) U_out^T (T, out),
    bits the packed int32 keep mask (T, ceil(in / 32)) of the dropout (empty when p = 0).
    x (T, in), u_in (in, r_in), core G (r_out, r_in), u_out (out, r_out); two launches (the
    shrink, and the GEMM forming B^T = s G^T U_out^T per output tile); ``gemm``: its variant."""
    bits = torch.empty(_bits_shape(x, p), dtype=torch.int32, device=x.device)
    s = shrink(x, u_in, p, seed, bits if p > 0 else None, partials=True)
    if s.dim() == 3:  # split-K partials of S at small T: the GEMM sums them and writes S
        parts, s = s, torch.empty((x.shape[0], u_in.shape[1]), dtype=x.dtype, device=x.device)
        y = gemm_ext(x, weight.t(), parts, u_out.t(), bias, variant=gemm, core=core.t(), scale=scale, a2_out=s)
    else:
        y = gemm_ext(x, weight.t(), s, u_out.t(), bias, variant=gemm, core=core.t(), scale=scale)
    return y, s, bits


@fake(linear_fwd)
def _(x, weight, bias, u_in, core, u_out, scale, p, seed, gemm):  # type: ignore[no-untyped-def]
    return (x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], u_in.shape[1])),
            x.new_empty(_bits_shape(x, p), dtype=torch.int32))


@torch.library.custom_op("flora_triton::linear_bwd", mutates_args=())
def linear_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, u_in: Tensor, core: Tensor, u_out: Tensor, scale: float, s: Tensor,
    bits: Tensor, p: float, need_dx: bool, need_du_in: bool, need_dcore: bool, need_du_out: bool,
    dbias_dtype: torch.dtype | None, gemm: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx (T, in), dU_in (in, r_in), dG (r_out, r_in), dU_out (out, r_out), dbias (out,)) of
    ``linear_fwd``, each in its input's dtype (dbias in ``dbias_dtype``; None: not asked); an
    empty tensor where not asked. dS, dB and dbias share one pass over dy plus a finish launch
    (``ds_db``), then the dx GEMM and the dU_in reduction: four launches at most."""
    mask = bits if p > 0 else None
    dx, du_in, dcore, du_out, dbias = (t.new_empty(0) for t in (x, u_in, core, u_out, x))
    need_db = need_dcore or need_du_out
    if not (need_dx or need_du_in or need_db or dbias_dtype is not None):
        return dx, du_in, dcore, du_out, dbias
    n_red = cg.reduce_programs(_tokens(x), 1, True) if need_du_in else 0
    counters = torch.empty((1 + n_red,), dtype=torch.int32, device=dy.device)  # zeroed by ds_db's first program
    ds, du_out_full, dcore_full, dbias_full = ds_db(dy, s, u_out, core, scale, need_db, dbias_dtype, counters=counters)
    if need_dcore:
        dcore = dcore_full
    if need_du_out:
        du_out = du_out_full
    if dbias_full is not None:
        dbias = dbias_full
    if need_dx:
        dx = gemm_ext(dy, weight, ds, u_in.t(), None, p, mask, variant=gemm)
    if need_du_in:
        du_in = cg.reduce(_tokens(x), _tokens(ds), 1, True, p, bits=mask.unsqueeze(0) if mask is not None else None,
                          dtype=u_in.dtype, counters=counters[1:])
    return dx, du_in, dcore, du_out, dbias


@fake(linear_bwd)
def _(dy, x, weight, u_in, core, u_out, scale, s, bits, p, need_dx, need_du_in, need_dcore, need_du_out,  # type: ignore[no-untyped-def]
      dbias_dtype, gemm):
    return (x.new_empty(x.shape if need_dx else (0,)), u_in.new_empty(u_in.shape if need_du_in else (0,)),
            core.new_empty(core.shape if need_dcore else (0,)), u_out.new_empty(u_out.shape if need_du_out else (0,)),
            x.new_empty((dy.shape[1],) if dbias_dtype is not None else (0,), dtype=dbias_dtype or x.dtype))


def _linear_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, weight, bias, u_in, core, u_out, scale, p, _seed, gemm = inputs
    ctx.save_for_backward(x, weight, u_in, core, u_out, output[1], output[2])
    ctx.scale, ctx.p, ctx.gemm = scale, p, gemm
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.set_materialize_grads(False)  # S and the bits get no gradient: no zero tensors for them


def _linear_backward(ctx, dy: Tensor | None, _ds: Tensor | None, _dbits: Tensor | None):  # type: ignore[no-untyped-def]
    need_x, _, need_bias, need_u_in, need_core, need_u_out = ctx.needs_input_grad[:6]
    if dy is None:
        return (None,) * 10
    x, weight, u_in, core, u_out, s, bits = ctx.saved_tensors
    dx, du_in, dcore, du_out, dbias = linear_bwd(dy, x, weight, u_in, core, u_out, ctx.scale, s, bits, ctx.p, need_x,
                                                 need_u_in, need_core, need_u_out, ctx.bias_dtype if need_bias else None,
                                                 ctx.gemm)
    return (dx if need_x else None, None, dbias if need_bias else None, du_in if need_u_in else None,
            dcore if need_core else None, du_out if need_u_out else None, None, None, None, None)


linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


# ----------------------------------------------------------------------------- entry points


def linear_factorized(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor], scale: float, dropout_p: float,
    gemm: str = "tiled",
) -> Tensor:
    """x (..., in) -> (..., out): x W^T + bias + drop(x) U_in (s G^T) U_out^T, in x's dtype; ``gemm``:
    the GEMM variant of both GEMMs (``GEMM_VARIANTS``).

    The core and factors go to the kernels as they are (cast per tile): no torch op runs
    besides the launches (shrink + GEMM forward; ``ds_db`` + finish, dx GEMM, dU_in backward)."""
    u_out, u_in = factors
    x2 = x.reshape(-1, x.shape[-1])
    seed = new_seed() if dropout_p > 0 else 0
    y = linear_fwd(x2, weight, bias, u_in, core, u_out, float(scale), dropout_p, seed, gemm)[0]
    return y.reshape(*x.shape[:-1], weight.shape[0])

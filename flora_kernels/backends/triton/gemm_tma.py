"""The extended-K GEMM of the FLoRA Linear as a persistent kernel with TMA (tensor descriptor)
loads and stores, for sm_90+ (Hopper); ``linear._gemm_ext_kernel`` serves older GPUs.

    y = keep / (1 - p) * (A2 B2) + A B + bias        A (M, K), B (K, N), A2 (M, R), B2 (R, N)

(the forward's B2 = s G^T U_out^T formed per tile from the core and U_out: ``rank_part``).

The grid is min(tiles, SMs); program i walks the (BM, BN) output tiles i, i + P, i + 2P, ...
in grouped order (GROUP_M row tiles share a column tile, so B stays in L2). Per tile: the
rank-R part (a few KiB, plain masked loads, any stride) seeds the accumulator, the dropout
mask (bits) is applied to it, then the K loop streams A and B through host-built tensor
descriptors (TMA zero-fills the M/N/K edges), and the epilogue adds the bias and stores the
tile through a descriptor (TMA clips it). B is read K-major (the forward's W (N, K)) or
N-major (the dx GEMM's W (K, N)).

TMA needs 16-byte aligned base addresses and row strides and unit inner strides:
``unsupported_reason`` says which operand breaks that (the caller then uses the tiled kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import INTERPRET, rank_pad, unpack_bits

# (BM, BN, BK, warps, stages): wgmma tiles for fp16/bf16; FMA tiles for exact fp32
_HALF_CONFIGS = ((128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4))
_FP32_CONFIGS = ((64, 64, 32, 8, 3), (64, 64, 16, 4, 3), (128, 64, 16, 8, 3))
_INTERPRET_TILE = (32, 32, 32, 4, 1)


def _set_blocks(nargs: dict) -> None:
    """Pre-hook: the descriptors' block shapes for the config's tiles."""
    bm, bn, bk = nargs["BM"], nargs["BN"], nargs["BK"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk] if nargs["B_KMAJOR"] else [bk, bn]
    nargs["y_desc"].block_shape = [bm, bn]


def _config(bm: int, bn: int, bk: int, w: int, s: int) -> triton.Config:
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s, pre_hook=_set_blocks)


_CONFIGS = {c: _config(*c) for c in _HALF_CONFIGS + _FP32_CONFIGS + (_INTERPRET_TILE,)}


def tma_configs(dtype: torch.dtype, arch: int) -> list[triton.Config]:
    """The autotune configs of ``_gemm_tma_kernel`` for ``dtype`` on compute capability ``arch``
    (none below sm_90: no TMA); all compile without spills at the benchmark shapes
    (``compile_check --all-configs``)."""
    if INTERPRET:
        return [_CONFIGS[_INTERPRET_TILE]]
    if arch < 90:
        return []
    return [_CONFIGS[c] for c in (_FP32_CONFIGS if dtype == torch.float32 else _HALF_CONFIGS)]


def _prune(configs: list[triton.Config], nargs: dict, **kwargs: object) -> list[triton.Config]:
    keep = tma_configs(nargs["a_desc"].base.dtype, 90)
    return [c for c in configs if c in keep]


@triton.jit
def grouped_tile(tile, n_pm, n_pn, GROUP_M: tl.constexpr):
    """(row tile, column tile) of linear tile index ``tile`` in grouped order: GROUP_M row tiles
    per group, column-major inside a group (consecutive tiles reuse one column tile of B)."""
    in_group = GROUP_M * n_pn
    first_m = (tile // in_group) * GROUP_M
    group_size = tl.minimum(n_pm - first_m, GROUP_M)
    return first_m + (tile % in_group) % group_size, (tile % in_group) // group_size


@triton.jit
def rank_part(a2_ptr, b2_ptr, c_ptr, bits_ptr, a2o_ptr, offs_m, offs_n, mask_m, mask_n, sa2k, sa2m, sa2r, sb2r, sb2n,
              scr, scq, sbits, p, scale, R, Q, A2_SPLIT, write_a2, RP: tl.constexpr, QP: tl.constexpr,
              FOLD: tl.constexpr, SUM_A2: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """The rank-R extension of an extended-K GEMM tile, the accumulator's start: A2[m, :R] B2[:R, n]
    in fp32, masked by the packed dropout bits and scaled by 1 / (1 - p) when DROPOUT.

    SUM_A2: A2 is given as A2_SPLIT fp32 split-K partials (stride sa2k), summed here in split order
    and rounded to a2o's dtype; programs with ``write_a2`` (one column tile) store that A2 to a2o,
    which has the partials' (M, R) strides (one offset tile for both: no spill in fp32).
    FOLD: B2 is not stored but formed per tile, B2[:, n] = scale * C V[:, n] with C (R, Q) at
    c_ptr (strides scr, scq) and V (Q, N) at b2_ptr: Q outer products of RP x BN in fp32 (QP unused)."""
    offs_r = tl.arange(0, RP)
    mask_r = offs_r < R
    ma = mask_m[:, None] & mask_r[None, :]
    a2_off = offs_m[:, None] * sa2m + offs_r[None, :] * sa2r
    if SUM_A2:
        a2f = tl.zeros((offs_m.shape[0], RP), dtype=tl.float32)
        for k in range(A2_SPLIT):
            a2f += tl.load(a2_ptr + k * sa2k + a2_off, mask=ma, other=0.0)
        a2 = a2f.to(a2o_ptr.dtype.element_ty)
        tl.store(a2o_ptr + a2_off, a2, mask=ma & write_a2)
    else:
        a2 = tl.load(a2_ptr + a2_off, mask=ma, other=0.0)
    if FOLD:  # Q rank-1 updates in fp32 (a dot here would hold a third fp32 tile: the fp32 FMA tiles spill)
        b2 = tl.zeros((RP, offs_n.shape[0]), dtype=tl.float32)
        for q in range(Q):
            cq = tl.load(c_ptr + offs_r * scr + q * scq, mask=mask_r, other=0.0).to(tl.float32)
            vq = tl.load(b2_ptr + q * sb2r + offs_n * sb2n, mask=mask_n, other=0.0).to(tl.float32)
            b2 += cq[:, None] * vq[None, :]
        b2 = b2 * scale
    else:
        b2 = tl.load(b2_ptr + offs_r[:, None] * sb2r + offs_n[None, :] * sb2n, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    acc = tl.dot(a2, b2.to(a2.dtype), input_precision=PREC)
    if DROPOUT:
        keep = unpack_bits(bits_ptr, offs_m, offs_n, sbits, mask_m[:, None] & mask_n[None, :])
        acc = tl.where(keep, acc / (1.0 - p), 0.0)
    return acc


@triton.autotune(
    configs=[_CONFIGS[_INTERPRET_TILE]] if INTERPRET else [_CONFIGS[c] for c in _HALF_CONFIGS + _FP32_CONFIGS],
    key=["M_BUCKET", "N", "K", "B_KMAJOR", "RP", "QP", "FOLD", "SUM_A2", "HAS_BIAS", "DROPOUT"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _gemm_tma_kernel(
    a_desc, b_desc, y_desc, a2_ptr, b2_ptr, c_ptr, a2o_ptr, bias_ptr, bits_ptr, M, N, K, R, Q, A2_SPLIT, M_BUCKET,
    NUM_PROGS, sa2k, sa2m, sa2r, sb2r, sb2n, scr, scq, sbits, p, scale,
    B_KMAJOR: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, RP: tl.constexpr, QP: tl.constexpr,
    FOLD: tl.constexpr, SUM_A2: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[m, n] = keep[m, n] / (1 - p) * sum_r A2[m, r] B2[r, n] + sum_k A[m, k] B[k, n] + bias[n].

    FOLD: B2 = scale * C V, formed per tile; SUM_A2: A2 from split-K partials, written to a2o by
    the first column tile's programs (``rank_part``). a_desc: A (M, K); b_desc: B^T (N, K) if B_KMAJOR else B (K, N); y_desc: y (M, N). keep
    (DROPOUT) is bit n % 32 of the int32 word bits[m, n // 32]. NUM_PROGS is the tile stride:
    the grid size, or more when the grid is min(NUM_PROGS, tiles) = tiles (one tile each).
    M_BUCKET only keys the autotuner."""
    pid = tl.program_id(0)
    n_pm = tl.cdiv(M, BM)
    n_pn = tl.cdiv(N, BN)
    for tile in tl.range(pid, n_pm * n_pn, NUM_PROGS):
        pid_m, pid_n = grouped_tile(tile, n_pm, n_pn, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        offs_m = off_m.to(tl.int64) + tl.arange(0, BM)
        offs_n = off_n.to(tl.int64) + tl.arange(0, BN)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = rank_part(a2_ptr, b2_ptr, c_ptr, bits_ptr, a2o_ptr, offs_m, offs_n, mask_m, mask_n, sa2k, sa2m, sa2r,
                        sb2r, sb2n, scr, scq, sbits, p, scale, R, Q, A2_SPLIT, pid_n == 0, RP, QP, FOLD,
                        SUM_A2, DROPOUT, PREC)
        for k0 in range(0, K, BK):
            a = a_desc.load([off_m, k0])
            if B_KMAJOR:
                b = b_desc.load([off_n, k0]).T
            else:
                b = b_desc.load([k0, off_n])
            acc = tl.dot(a, b, acc, input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


_gemm_tma_kernel.configs_for = tma_configs  # compile_check compiles what the pruning keeps per target
_gemm_tma_kernel.no_configs_reason = "TMA (tensor descriptors) needs sm_90+; the tiled gemm_ext serves older GPUs"


def _tma_ok(t: Tensor) -> bool:
    """A 2-D operand TMA can address: unit inner stride, distinct rows, 16-byte aligned base and
    row stride."""
    e = t.element_size()
    return (t.stride(1) == 1 and t.stride(0) >= max(t.shape[1], 1) and (t.stride(0) * e) % 16 == 0
            and t.data_ptr() % 16 == 0)


def unsupported_reason(a: Tensor, b: Tensor, n: int) -> str | None:
    """Why the TMA kernel cannot run y = a b for a (M, K), b (K, N) (y (M, N) allocated
    contiguous): None when it can. Off CUDA (the interpreter, compile_check's meta tensors)
    only the layout is checked."""
    if a.device.type == "cuda" and not INTERPRET:
        major, minor = torch.cuda.get_device_capability(a.device)
        if major < 9:
            return f"TMA needs compute capability >= 9.0, got {major}.{minor}"
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"TMA kernel dtypes: float16, bfloat16, float32, got {a.dtype}"
    if not _tma_ok(a):
        return f"x/dy {tuple(a.shape)} strides {a.stride()}: TMA needs unit column stride, distinct rows and 16-byte aligned rows/base"
    if not (_tma_ok(b.t()) or _tma_ok(b)):
        return f"weight (K, N) {tuple(b.shape)} strides {b.stride()}: TMA needs one unit stride and 16-byte aligned rows/base"
    if (n * a.element_size()) % 16:
        return f"out features {n}: TMA stores need rows of a multiple of 16 bytes"
    return None


def sm_count(device: torch.device) -> int:
    """The persistent grid's cap: the SM count on CUDA, 4 elsewhere (the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def gemm_tma(
    a: Tensor, b: Tensor, a2: Tensor, b2: Tensor, bias: Tensor | None, p: float, bits: Tensor | None,
    m_bucket: int, rp: int, prec: str, programs: int | None = None, core: Tensor | None = None, scale: float = 1.0,
    a2_out: Tensor | None = None,
) -> Tensor:
    """y = a b + mask * (A2 B2) + bias, as ``linear.gemm_ext`` (which checks the shapes):
    a (M, K), b (K, N), bits int32 (M, ceil(N / 32)); A2 = a2 (M, R), or with ``a2_out`` (M, R)
    the sum of a2's fp32 split-K partials (split, M, R), also written to a2_out; B2 = b2 (R, N),
    or with ``core`` (R, Q) B2 = scale * core b2 for b2 (Q, N), formed per tile. ``programs``
    caps the persistent grid (default: one program per SM). Raises ValueError when
    ``unsupported_reason`` is not None."""
    m, k = a.shape
    n, r = b.shape[1], a2.shape[-1]
    why = unsupported_reason(a, b, n)
    if why is not None:
        raise ValueError(f"gemm_tma: {why}")
    y = torch.empty((m, n), dtype=a.dtype, device=a.device)
    kmajor = _tma_ok(b.t())
    block = [16, 16]  # set per config by _set_blocks
    a_desc = TensorDescriptor(a, [m, k], [a.stride(0), 1], block)
    bt = b.t() if kmajor else b
    b_desc = TensorDescriptor(bt, list(bt.shape), [bt.stride(0), 1], list(block))
    y_desc = TensorDescriptor(y, [m, n], [n, 1], list(block))
    cap = programs if programs is not None else sm_count(a.device)
    q = core.shape[1] if core is not None else r
    a2s = a2.stride() if a2.dim() == 3 else (0, *a2.stride())

    def grid(meta: dict) -> tuple[int]:
        return (min(cap, triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"])),)

    _gemm_tma_kernel[grid](
        a_desc, b_desc, y_desc, a2, b2, core if core is not None else y, a2_out if a2_out is not None else y,
        bias if bias is not None else y, bits if bits is not None else y,
        m, n, k, r, q, a2.shape[0] if a2_out is not None else 1, m_bucket, cap,
        *a2s, b2.stride(0), b2.stride(1), *(core.stride() if core is not None else (0, 0)),
        bits.stride(0) if bits is not None else 0,
        float(p), float(scale),
        B_KMAJOR=kmajor, HAS_BIAS=bias is not None, DROPOUT=p > 0, RP=rp, QP=rank_pad(q), FOLD=core is not None,
        SUM_A2=a2_out is not None, PREC=prec,
    )
    return y

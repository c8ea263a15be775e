"""FLoRA Linear in Triton: the factorized path (fused shrink / GEMM-with-epilogue / extended-K dx).
The merged path is the reconstruct kernel + torch's matmul, composed in ``backends.merged``.

Factorized, with B = s U_out G (out, r_in) folded in torch (tiny, differentiable):

    forward:  S = drop(x) U_in                          (T, r_in)   channel_gemm.project
              y = x W^T + bias + S B^T                  one GEMM, the rank part as extra K steps
    backward: dS = dy B                                  (T, r_in)   channel_gemm.project
              dx = dy W + mask * (dS U_in^T)             one GEMM over an extended K loop
              dU_in = drop(x)^T dS, dB = dy^T S          token reductions, no T x out temporaries

The dropout mask is recomputed from a seed in every kernel; nothing of size T x in is stored.
The base weight and bias are frozen: the op returns no weight gradient (the backend refuses a
call whose weight requires grad); the bias gradient is dy summed over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import channel_gemm as cg
from ._common import INTERPRET, MAX_RANK, dot_precision, keep_mask, new_seed, rank_pad

# ----------------------------------------------------------------------------- kernels


def _gemm_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 4}, num_warps=4)]
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in (
            (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4),
        )
    ]


@triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "RP", "HAS_BIAS", "DROPOUT"])
@triton.jit
def _gemm_ext_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, bias_ptr, y_ptr, M, N, K, R,
    sam, sak, sbk, sbn, sa2m, sa2r, sb2r, sb2n, sym, syn, p, seed,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, RP: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[m, n] = sum_k A[m, k] B[k, n] + keep(n * M + m) / (1 - p) * sum_r A2[m, r] B2[r, n] + bias[n]."""
    pid = tl.program_id(0)
    n_pm = tl.cdiv(M, BM)
    n_pn = tl.cdiv(N, BN)
    in_group = GROUP_M * n_pn
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(n_pm - first_m, GROUP_M)
    pid_m = (first_m + (pid % in_group) % group_size).to(tl.int64)
    pid_n = ((pid % in_group) // group_size).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK).to(tl.int64)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * sam + offs_k[None, :] * sak, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * sbk + offs_n[None, :] * sbn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    # the rank-R extension of the K loop
    offs_r = tl.arange(0, RP)
    mask_r = offs_r < R
    a2 = tl.load(a2_ptr + offs_m[:, None] * sa2m + offs_r[None, :] * sa2r, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    b2 = tl.load(b2_ptr + offs_r[:, None] * sb2r + offs_n[None, :] * sb2n, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    if DROPOUT:
        ext = tl.dot(a2, b2.to(a2.dtype), input_precision=PREC)
        keep = keep_mask(seed, offs_n[None, :] * M + offs_m[:, None], p)
        acc += tl.where(keep, ext / (1.0 - p), 0.0)
    else:
        acc = tl.dot(a2, b2.to(a2.dtype), acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * sym + offs_n[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- launchers


def gemm_ext(
    a: Tensor, b: Tensor, a2: Tensor, b2: Tensor, bias: Tensor | None, p: float = 0.0, seed: int = 0
) -> Tensor:
    """y = a b + mask * (a2 b2) + bias: a (M, K), b (K, N), a2 (M, R), b2 (R, N), any strides.

    The mask (p > 0) is the dropout mask of an (M, N) token-major input. Returns (M, N) in a's dtype."""
    m, k = a.shape
    n, r = b.shape[1], a2.shape[1]
    torch._check(b.shape[0] == k and a2.shape[0] == m and tuple(b2.shape) == (r, n),
                 lambda: f"gemm_ext: shapes {tuple(a.shape)} {tuple(b.shape)} {tuple(a2.shape)} {tuple(b2.shape)} do not chain")
    torch._check(a.dtype == b.dtype, lambda: f"expected x and weight of one dtype, got {a.dtype} and {b.dtype}")
    torch._check(r <= MAX_RANK, lambda: f"rank: expected <= {MAX_RANK}, got {r}")
    y = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if y.numel() == 0:
        return y
    a2, b2 = a2.to(a.dtype), b2.to(a.dtype)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

    _gemm_ext_kernel[grid](
        a, b, a2, b2, bias if bias is not None else y, y, m, n, k, r,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1),
        y.stride(0), y.stride(1), float(p), int(seed),
        HAS_BIAS=bias is not None, DROPOUT=p > 0, RP=rank_pad(r), PREC=dot_precision(a.dtype),
    )
    return y


def _tokens(t: Tensor) -> Tensor:
    """(T, C) as the (1, C, T) channel view the channel GEMMs take."""
    return t.t().unsqueeze(0)


def shrink(x: Tensor, u: Tensor, p: float = 0.0, seed: int = 0) -> Tensor:
    """S = drop(x) U: x (T, in), u (in, r) -> (T, r) in x's dtype."""
    s = torch.empty((x.shape[0], u.shape[1]), dtype=x.dtype, device=x.device)
    cg.project(_tokens(x), u, 1, _tokens(s), True, p, seed)
    return s


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("flora_triton::linear_fwd", mutates_args=())
def linear_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, u_in: Tensor, b: Tensor, p: float, seed: int
) -> tuple[Tensor, Tensor]:
    """(y, S): S = drop(x) U_in (T, r), y = x W^T + bias + S B^T (T, out). x (T, in), b (out, r)."""
    s = shrink(x, u_in, p, seed)
    y = gemm_ext(x, weight.t(), s, b.t(), bias)
    return y, s


@linear_fwd.register_fake
def _(x, weight, bias, u_in, b, p, seed):  # type: ignore[no-untyped-def]
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], u_in.shape[1]))


@torch.library.custom_op("flora_triton::linear_bwd", mutates_args=())
def linear_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, u_in: Tensor, b: Tensor, s: Tensor, p: float, seed: int,
    need_dx: bool, need_du_in: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx (T, in), dU_in (in, r), dB (out, r)) of ``linear_fwd``; an empty tensor where not asked."""
    dx, du_in, db = x.new_empty(0), u_in.new_empty(0), b.new_empty(0)
    if need_dx or need_du_in:
        ds = shrink(dy, b.to(dy.dtype))
        if need_dx:
            dx = gemm_ext(dy, weight, ds, u_in.t(), None, p, seed)
        if need_du_in:
            du_in = cg.reduce(_tokens(x), _tokens(ds), 1, True, p, seed).to(u_in.dtype)
    if need_db:
        db = cg.reduce(_tokens(dy), _tokens(s), 1, True).to(b.dtype)
    return dx, du_in, db


@linear_bwd.register_fake
def _(dy, x, weight, u_in, b, s, p, seed, need_dx, need_du_in, need_db):  # type: ignore[no-untyped-def]
    return (x.new_empty(x.shape if need_dx else (0,)), u_in.new_empty(u_in.shape if need_du_in else (0,)),
            b.new_empty(b.shape if need_db else (0,)))


def _linear_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, weight, _bias, u_in, b, p, seed = inputs
    ctx.save_for_backward(x, weight, u_in, b, output[1])
    ctx.p, ctx.seed = p, seed


def _linear_backward(ctx, dy: Tensor, _ds: Tensor):  # type: ignore[no-untyped-def]
    x, weight, u_in, b, s = ctx.saved_tensors
    need_x, _, need_bias, need_u, need_b = ctx.needs_input_grad[:5]
    dx, du_in, db = linear_bwd(dy, x, weight, u_in, b, s, ctx.p, ctx.seed, need_x, need_u, need_b)
    dbias = dy.sum(0) if need_bias else None
    return dx if need_x else None, None, dbias, du_in if need_u else None, db if need_b else None, None, None


linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


# ----------------------------------------------------------------------------- entry points


def linear_factorized(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor], scale: float, dropout_p: float,
) -> Tensor:
    """x (..., in) -> (..., out): x W^T + bias + drop(x) U_in (s G^T) U_out^T, in x's dtype."""
    dt = x.dtype
    u_out, u_in = (f.to(dt) for f in factors)
    b = (u_out @ core.to(dt)) * scale
    x2 = x.reshape(-1, x.shape[-1])
    seed = new_seed() if dropout_p > 0 else 0
    y, _ = linear_fwd(x2, weight, bias, u_in, b, dropout_p, seed)
    return y.reshape(*x.shape[:-1], weight.shape[0])


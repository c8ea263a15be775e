"""The factorized FLoRA Conv2d as one implicit GEMM per direction (groups = 1, zero padding),
the adapter riding as a K extension of the base conv so that y and dx are written once.

With z = drop(x) U_in (N, r_in, H, W) and u = conv(z, s K) (N, r_out, Ho, Wo) computed first
(channel_gemm.project, core_conv: small), for output rows m = (n, p) (M = N Ho Wo) and columns o:

    forward:  y[m, o]  = bias[o] + sum_r u[m, r] U_out[o, r] + sum_{t, c} x[n, c, p st - pad + k_t dil] W[o, c, t]
    backward: dx[m, c] = mask / (1 - p) * sum_a dz[m, a] U_in[c, a] + sum_{t, o} dy[n, o, q_t(m)] W[o, c, t]

where, for dx, the rows are x's positions (M = N H W), mask the dropout keep mask of x written
1 bit per element by the shrink (saved for the backward, as the Linear does) and q_t(m) = (m + pad - k_t dil) / st where
the stride divides it and it lies inside dy (the transposed conv as a gather: exact for any stride,
but a stride s > 1 issues s^2 times the useful MACs, masked). K = kh kw C_in (+ r_out), resp.
kh kw C_out (+ r_in), looped tap-major with channel blocks of BK inside each tap. dz comes from
du = dy U_out through the core conv's transpose (core_conv). The frozen base weight gets no
gradient; the adapter gradients (dU_out, dK, dU_in, dbias) use the channel GEMMs and core conv.
Tensors may have any strides; channels_last (channel-minor) gives contiguous K loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...convspec import ConvSpec
from ..oplib import fake
from . import channel_gemm as cg
from ._common import INTERPRET, MAX_RANK, dot_precision, mask_words, rank_pad, unpack_bits
from .core_conv import core_conv_backward, core_conv_forward

# ----------------------------------------------------------------------------- kernel

# (BM, BN, BK, warps, stages): tensor-core tiles for fp16/bf16; exact-fp32 (FMA) tiles for fp32
_HALF_CONFIGS = ((128, 64, 64, 4, 3), (64, 64, 64, 4, 4), (128, 128, 64, 8, 3), (256, 64, 64, 8, 3), (128, 64, 32, 4, 4))
_FP32_CONFIGS = ((64, 64, 32, 4, 3), (128, 64, 32, 8, 3))
_INTERPRET_CONFIG = triton.Config({"BM": 64, "BN": 32, "BK": 16, "GROUP_M": 4}, num_warps=4)
_CONFIGS = {
    c: triton.Config({"BM": c[0], "BN": c[1], "BK": c[2], "GROUP_M": 8}, num_warps=c[3], num_stages=c[4])
    for c in _HALF_CONFIGS + _FP32_CONFIGS
}


def igemm_configs(dtype: torch.dtype, arch: int) -> list[triton.Config]:
    """The autotune configs of ``_igemm_kernel`` for operands of ``dtype`` (any target ``arch``)."""
    if INTERPRET:
        return [_INTERPRET_CONFIG]
    return [_CONFIGS[c] for c in (_FP32_CONFIGS if dtype == torch.float32 else _HALF_CONFIGS)]


def _prune(configs: list[triton.Config], nargs: dict, **kwargs: object) -> list[triton.Config]:
    keep = igemm_configs(nargs["a_ptr"].dtype, 90)
    return [c for c in configs if c in keep]


@triton.autotune(
    configs=[_INTERPRET_CONFIG] if INTERPRET else list(_CONFIGS.values()),
    key=["M_BUCKET", "NO", "C", "KH", "KW", "sac", "TRANSPOSED", "HAS_BIAS", "DROPOUT", "RP"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _igemm_kernel(
    a_ptr, w_ptr, e_ptr, f_ptr, bias_ptr, bits_ptr, y_ptr,
    M, M_BUCKET, NO, C, R, S1, S2, P1, P2, KH, KW, st1, st2, pd1, pd2, dl1, dl2,
    san, sac, sa1, sa2, swk, swn, swh, sww, sen, ser, se1, se2, sfr, sfn, syn, syc, sy1, sy2, sbits, p,
    TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, RP: tl.constexpr,
    PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[b, o, q] = bias[o] + keep / (1 - p) * sum_r e[b, r, q] F[r, o] + sum_{t, c} A[b, c, src_t(q)] W_t[c, o].

    y, e: (NB, NO | R, P1, P2); A: (NB, C, S1, S2), zero outside; W_t[c, o] at c swk + o swn + kh swh + kw sww.
    src_t(q) = q st - pad + k dil (forward), or (q + pad - k dil) / st where exact (TRANSPOSED).
    keep (DROPOUT) is bit o % 32 of the int32 word bits[m, o // 32] (m = (b, q) flattened), the
    packed dropout mask of y's elements. M_BUCKET only keys the autotuner (with sac: the layout)."""
    pid = tl.program_id(0)
    n_pm = tl.cdiv(M, BM)
    n_pn = tl.cdiv(NO, BN)
    in_group = GROUP_M * n_pn
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(n_pm - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    offs_m = pid_m * BM + tl.arange(0, BM)  # int32 (the launcher checks M < 2^31); offsets in int64
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < NO
    b = offs_m // (P1 * P2)
    q1 = (offs_m // P2) % P1
    q2 = offs_m % P2
    # the rank-R extension of the K loop, first (masked by the dropout keep of y's elements)
    offs_r = tl.arange(0, RP)
    mask_r = offs_r < R
    e = tl.load(e_ptr + (b.to(tl.int64) * sen + q1 * se1 + q2 * se2)[:, None] + offs_r[None, :] * ser,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    f = tl.load(f_ptr + offs_r[:, None] * sfr + offs_n[None, :] * sfn, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    acc = tl.dot(e, f.to(e.dtype), input_precision=PREC)
    if DROPOUT:
        keep = unpack_bits(bits_ptr, offs_m.to(tl.int64), offs_n, sbits, mask_m[:, None] & mask_n[None, :])
        acc = tl.where(keep, acc / (1.0 - p), 0.0)
    # the base conv: taps outer, channel blocks inner, flattened into one loop; per row only the
    # sample's offset and the tap-independent part of the source coordinates stay live
    a_row = a_ptr + b.to(tl.int64) * san
    if TRANSPOSED:
        h0 = q1 + pd1
        w0 = q2 + pd2
    else:
        h0 = q1 * st1 - pd1
        w0 = q2 * st2 - pd2
    offs_k = tl.arange(0, BK)
    n_cb = (C + BK - 1) // BK
    for kk in range(KH * KW * n_cb):
        t = kk // n_cb
        c0 = (kk % n_cb) * BK
        k1 = t // KW
        k2 = t % KW
        if TRANSPOSED:
            a1 = h0 - k1 * dl1
            a2 = w0 - k2 * dl2
            i1 = a1 // st1
            i2 = a2 // st2
            ok = mask_m & (a1 >= 0) & (a2 >= 0) & (i1 * st1 == a1) & (i2 * st2 == a2) & (i1 < S1) & (i2 < S2)
        else:
            i1 = h0 + k1 * dl1
            i2 = w0 + k2 * dl2
            ok = mask_m & (i1 >= 0) & (i1 < S1) & (i2 >= 0) & (i2 < S2)
        offs_c = c0 + offs_k
        mask_c = offs_c < C
        a = tl.load(a_row[:, None] + (i1 * sa1 + i2 * sa2)[:, None] + offs_c[None, :] * sac,
                    mask=ok[:, None] & mask_c[None, :], other=0.0)
        w = tl.load(w_ptr + offs_c[:, None] * swk + offs_n[None, :] * swn + (k1 * swh + k2 * sww),
                    mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    b = offs_m // (P1 * P2)
    q1 = (offs_m // P2) % P1
    q2 = offs_m % P2
    dst = y_ptr + (b.to(tl.int64) * syn + q1 * sy1 + q2 * sy2)[:, None] + offs_n[None, :] * syc
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_igemm_kernel.configs_for = igemm_configs  # compile_check compiles what the pruning keeps per target


# ----------------------------------------------------------------------------- launcher


def unsupported_reason(x_dim: int, spec: ConvSpec) -> str | None:
    """Why the implicit-GEMM variant cannot run a conv of this geometry (None: it can)."""
    if x_dim != 4 or spec.dims != 2:
        return f"the implicit-GEMM conv is 2-D only, got a {spec.dims}-D conv"
    if spec.groups != 1:
        return f"the implicit-GEMM conv needs groups = 1, got {spec.groups}"
    if spec.padding_mode != "zeros":
        return f"the implicit-GEMM conv needs padding_mode 'zeros', got {spec.padding_mode!r}"
    return None


def _out_like(shape: tuple[int, ...], x: Tensor, weight: Tensor) -> Tensor:
    """An empty (N, C, H, W) tensor, channels_last when x or the weight is (as torch's conv picks)."""
    cl = any(not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last) for t in (x, weight))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last if cl else torch.contiguous_format)


def igemm(
    a: Tensor, weight: Tensor, e: Tensor, f: Tensor, bias: Tensor | None, out: Tensor, stride: list[int],
    pads: list[int], dilation: list[int], transposed: bool, p: float = 0.0, bits: Tensor | None = None,
) -> Tensor:
    """Writes the implicit GEMM of the module docstring into ``out`` and returns it.

    Forward (``transposed`` False): a = x (N, C_in, H, W), out = y (N, C_out, Ho, Wo), e = u
    (N, r, Ho, Wo), f = U_out (C_out, r). Input gradient: a = dy (N, C_out, Ho, Wo), out = dx
    (N, C_in, H, W), e = dz (N, r, H, W), f = U_in (C_in, r), with p > 0 the dropout keep mask of
    dx's elements read from ``bits`` (int32 (N, H W, ceil(C_in / 32)), as ``channel_gemm.project``
    writes it). weight: (C_out, C_in, kh, kw); pads: (before, after) per dim."""
    nb, no = out.shape[0], out.shape[1]
    r = f.shape[1]
    torch._check(a.dim() == 4 and weight.dim() == 4 and out.dim() == 4 and e.dim() == 4,
                 lambda: f"igemm: expected 4-D a, weight, e and out, got {a.dim()}, {weight.dim()}, {e.dim()}, {out.dim()}")
    c = weight.shape[0] if transposed else weight.shape[1]
    torch._check(a.shape[1] == c and weight.shape[1 if transposed else 0] == no,
                 lambda: f"igemm: a {tuple(a.shape)}, weight {tuple(weight.shape)} and out {tuple(out.shape)} do not chain")
    torch._check(tuple(e.shape) == (nb, r, *out.shape[2:]) and f.shape[0] == no,
                 lambda: f"igemm: expected e {(nb, r, *out.shape[2:])} and f ({no}, {r}), got {tuple(e.shape)} and {tuple(f.shape)}")
    torch._check(r <= MAX_RANK, lambda: f"rank: expected <= {MAX_RANK}, got {r}")
    torch._check(max(out.numel(), a.numel()) < 2**31,
                 lambda: f"igemm: expected a and out of < 2^31 elements, got {a.numel()} and {out.numel()}")
    torch._check(a.dtype == weight.dtype, lambda: f"expected x and weight of one dtype, got {a.dtype} and {weight.dtype}")
    torch._check(p <= 0 or (bits is not None and bits.dtype == torch.int32 and bits.is_contiguous()
                            and tuple(bits.shape) == (nb, out.shape[2] * out.shape[3], mask_words(no))),
                 lambda: f"igemm: dropout (p > 0) needs contiguous int32 mask bits {(nb, out.shape[2] * out.shape[3], mask_words(no))}")
    if out.numel() == 0:
        return out
    e, f = e.to(a.dtype), f.to(a.dtype)
    m = nb * out.shape[2] * out.shape[3]
    swk, swn = (weight.stride(0), weight.stride(1)) if transposed else (weight.stride(1), weight.stride(0))

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(no, meta["BN"]),)

    _igemm_kernel[grid](
        a, weight, e, f, bias if bias is not None else out, bits if bits is not None else out, out,
        m, max(16, triton.next_power_of_2(m)), no, c, r, *a.shape[2:], *out.shape[2:], *weight.shape[2:],
        *stride, pads[0], pads[2], *dilation,
        *a.stride(), swk, swn, weight.stride(2), weight.stride(3), *e.stride(), f.stride(1), f.stride(0),
        *out.stride(), mask_words(no), float(p),
        TRANSPOSED=transposed, HAS_BIAS=bias is not None, DROPOUT=p > 0, RP=rank_pad(r), PREC=dot_precision(a.dtype),
    )
    return out


# ----------------------------------------------------------------------------- custom ops


def _fwd_shapes(x: Tensor, weight: Tensor, u_in: Tensor, k: Tensor, stride: list[int], pads: list[int],
                dilation: list[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(y, z, u) shapes of ``conv_igemm_fwd``."""
    spec = ConvSpec(tuple(stride), tuple(zip(pads[::2], pads[1::2])), tuple(dilation), 1, "zeros")
    out = spec.output_size(x.shape[2:], weight.shape[2:])
    return (x.shape[0], weight.shape[0], *out), (x.shape[0], u_in.shape[1], *x.shape[2:]), (x.shape[0], k.shape[0], *out)


def _bits_shape(x: Tensor, p: float) -> tuple[int, ...]:
    return (x.shape[0], x.shape[2] * x.shape[3], mask_words(x.shape[1])) if p > 0 else (0,)


@torch.library.custom_op("flora_triton::conv_igemm_fwd", mutates_args=())
def conv_igemm_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, u_in: Tensor, k: Tensor, u_out: Tensor, stride: list[int],
    pads: list[int], dilation: list[int], p: float, seed: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, z, u, bits): z = drop(x) U_in (N, r_in, H, W), u = conv(z, k) (N, r_out, Ho, Wo) and
    y = conv(x, W) + bias + u U_out^T (N, C_out, Ho, Wo), one implicit GEMM writing y once; bits
    the packed int32 keep mask (N, H W, ceil(C_in / 32)) of the dropout (empty when p = 0).
    x (N, C_in, H, W), weight (C_out, C_in, kh, kw), u_in (C_in, r_in), k (r_out, r_in, kh, kw)
    (the scaled core kernel), u_out (C_out, r_out); zero padding ``pads`` (before, after per dim)."""
    y_shape, z_shape, u_shape = _fwd_shapes(x, weight, u_in, k, stride, pads, dilation)
    bits = torch.empty(_bits_shape(x, p), dtype=torch.int32, device=x.device)
    z = cg.project(x, u_in, 1, _out_like(z_shape, x, x), True, p, seed, bits if p > 0 else None)
    u = core_conv_forward(z, k, stride, pads, dilation, 1, _out_like(u_shape, x, x))
    y = igemm(x, weight, u, u_out, bias, _out_like(y_shape, x, weight), stride, pads, dilation, False)
    return y, z, u, bits


@fake(conv_igemm_fwd)
def _(x, weight, bias, u_in, k, u_out, stride, pads, dilation, p, seed):  # type: ignore[no-untyped-def]
    y_shape, z_shape, u_shape = _fwd_shapes(x, weight, u_in, k, stride, pads, dilation)
    return (_out_like(y_shape, x, weight), _out_like(z_shape, x, x), _out_like(u_shape, x, x),
            x.new_empty(_bits_shape(x, p), dtype=torch.int32))


@torch.library.custom_op("flora_triton::conv_igemm_bwd", mutates_args=())
def conv_igemm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, u_in: Tensor, k: Tensor, u_out: Tensor, z: Tensor, u: Tensor, bits: Tensor,
    stride: list[int], pads: list[int], dilation: list[int], p: float,
    need_dx: bool, need_du_in: bool, need_dk: bool, need_du_out: bool, need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx like x, dU_in, dK, dU_out, dbias (C_out,)) of ``conv_igemm_fwd``; an empty tensor where not
    asked. dx = base conv's input gradient + mask * dz U_in^T in one implicit GEMM (written once)."""
    dx, du_in, dk, du_out, dbias = x.new_empty(0), u_in.new_empty(0), k.new_empty(0), u_out.new_empty(0), dy.new_empty(0)
    mask = bits if p > 0 else None
    if need_du_out:
        du_out = cg.reduce(dy, u, 1, False).to(u_out.dtype)
    if need_dbias:
        dbias = dy.sum((0, 2, 3))
    need_dz = need_dx or need_du_in
    if need_dz or need_dk:
        du = cg.project(dy, u_out, 1, torch.empty_like(u), False)
        dz, dk_full = core_conv_backward(du, z, k, stride, pads, dilation, 1, torch.empty_like(z) if need_dz else None, need_dk)
        dk = dk_full if dk_full is not None else dk
        if need_dx:
            dx = igemm(dy, weight, dz, u_in, None, torch.empty_like(x), stride, pads, dilation, True, p, mask)
        if need_du_in:
            du_in = cg.reduce(x, dz, 1, True, p, bits=mask).to(u_in.dtype)
    return dx, du_in, dk, du_out, dbias


@fake(conv_igemm_bwd)
def _(dy, x, weight, u_in, k, u_out, z, u, bits, stride, pads, dilation, p, need_dx, need_du_in, need_dk, need_du_out, need_dbias):  # type: ignore[no-untyped-def]
    return (torch.empty_like(x) if need_dx else x.new_empty(0), u_in.new_empty(u_in.shape if need_du_in else (0,)),
            k.new_empty(k.shape if need_dk else (0,)), u_out.new_empty(u_out.shape if need_du_out else (0,)),
            dy.new_empty((dy.shape[1],) if need_dbias else (0,)))


def _igemm_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, weight, bias, u_in, k, u_out, stride, pads, dilation, p, _seed = inputs
    ctx.save_for_backward(x, weight, u_in, k, u_out, *output[1:])
    ctx.geometry, ctx.p = (stride, pads, dilation), p
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _igemm_backward(ctx, dy: Tensor, _dz: Tensor, _du: Tensor, _dbits: Tensor):  # type: ignore[no-untyped-def]
    need_x, _, need_bias, need_uin, need_k, need_uout = ctx.needs_input_grad[:6]
    dx, du_in, dk, du_out, dbias = conv_igemm_bwd(
        dy, *ctx.saved_tensors, *ctx.geometry, ctx.p, need_x, need_uin, need_k, need_uout, need_bias,
    )
    return (dx if need_x else None, None, dbias.to(ctx.bias_dtype) if need_bias else None, du_in if need_uin else None,
            dk if need_k else None, du_out if need_uout else None) + (None,) * 5


conv_igemm_fwd.register_autograd(_igemm_backward, setup_context=_igemm_setup)

"""The factorized FLoRA ConvNd (d = 1, 2, 3, any groups but depthwise, every padding mode) as one
implicit GEMM per direction, the adapter riding as a K extension of the base conv so that y and
(with zero padding) dx are written once.

With z = drop(x) U_in (N, G r_in, *in) and u = conv(z, s K) (N, G r_out, *out) computed first
(channel_gemm.project, core_conv: small), for output rows m = (n, p) (M = N prod(out)) and the
columns o of group g (G groups: a grid axis; W (C_out, C_in / G, *k)):

    forward:  y[m, g O + o]  = bias + sum_r u[m, g r_out + r] U_out[g O + o, r] + sum_{t, c} x[n, g C + c, p st - pad + k_t dil] W[g O + o, c, t]
    backward: dx[m, g C + c] = mask / (1 - p) * sum_a dz[m, g r_in + a] U_in[c, a] + sum_{t, o} dy[n, g O + o, q_t(m)] W[g O + o, c, t]

(O = C_out / G, C = C_in / G; U_in is shared by the groups, U_out has its rows per group, as the
reference defines them). For dx the rows are x's positions (M = N prod(in)), mask the dropout
keep mask of x, 1 bit per element (written by the shrink for G = 1, by ``mask_bits`` from the
same Philox draws for G > 1; saved for the backward, as the Linear does), and q_t(m) = (m + pad
- k_t dil) / st where the stride divides it and it lies inside dy (the transposed conv as a
gather: exact for any stride, but a stride s > 1 issues s^d times the useful MACs, masked).
K = prod(k) C (+ r_out), resp. prod(k) O (+ r_in), looped tap-major with channel blocks of BK
inside each tap. 1-D and 2-D convs run as D = 2 with a unit leading dim (views, no copies), 3-D
as D = 3. Zero padding, asymmetric too, is the kernel's bounds (before-pads); other padding
modes pad x and z explicitly (F.pad, as the cudnn variant does) and run valid convs; their dx
is the base part over the padded input through the pad's adjoint plus the adapter part added in
place by ``channel_gemm.expand``. dz comes from du = dy U_out through the core conv's transpose
(core_conv). The frozen base weight gets no gradient; the adapter gradients (dU_out, dK, dU_in,
dbias) use the channel GEMMs and core conv. Tensors may have any strides; channels-last
(channel-minor) gives contiguous K loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ...convspec import ConvSpec, _explicit_pad, pad_adjoint
from ..oplib import fake
from . import channel_gemm as cg
from ._common import INTERPRET, MAX_RANK, block, dot_precision, keep_mask, mask_words, pack_bits, rank_pad, unpack_bits
from .core_conv import core_conv_backward, core_conv_forward, strides3

# ----------------------------------------------------------------------------- kernel

# (BM, BN, BK, warps, stages): tensor-core tiles for fp16/bf16; exact-fp32 (FMA) tiles for fp32
_HALF_CONFIGS = ((128, 64, 64, 4, 3), (64, 64, 64, 4, 4), (128, 128, 64, 8, 3), (256, 64, 64, 8, 3), (128, 64, 32, 4, 4))
_FP32_CONFIGS = ((64, 64, 32, 8, 3), (128, 64, 32, 8, 3))
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
    key=["M_BUCKET", "NO", "C", "K1", "K2", "K3", "sac", "TRANSPOSED", "HAS_BIAS", "DROPOUT", "RP"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _igemm_kernel(
    a_ptr, w_ptr, e_ptr, f_ptr, bias_ptr, bits_ptr, y_ptr,
    M, M_BUCKET, NO, C, R, S1, S2, S3, P1, P2, P3, K1, K2, K3,
    st1, st2, st3, pd1, pd2, pd3, dl1, dl2, dl3,
    san, sac, sa1, sa2, sa3, swk, swn, sw1, sw2, sw3, swg, sen, ser, se1, se2, se3, sfr, sfn, sfg,
    syn, syc, sy1, sy2, sy3, sbits, p,
    D: tl.constexpr, TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, RP: tl.constexpr,
    PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[b, g NO + o, q] = bias + keep / (1 - p) * sum_r e[b, g R + r, q] F_g[r, o] + sum_{t, c} A[b, g C + c, src_t(q)] W_gt[c, o].

    Group g = program_id(1). y, e: (NB, G NO | G R, P1, P2, P3); A: (NB, G C, S1, S2, S3), zero
    outside; W_gt[c, o] at g swg + c swk + o swn + k1 sw1 + k2 sw2 + k3 sw3; F_g[r, o] at
    g sfg + r sfr + o sfn. D = 3, or 2 with S1 = P1 = K1 = 1 (1-D and 2-D convs: the first
    spatial dim compiled out). src_t(q) = q st - pad + k dil (forward), or (q + pad - k dil) / st
    where exact (TRANSPOSED). keep (DROPOUT) is bit (g NO + o) % 32 of the int32 word
    bits[m, (g NO + o) // 32] (m = (b, q) flattened), the packed dropout mask of y's elements.
    M_BUCKET only keys the autotuner (with sac: the layout)."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
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
    a_ptr += g.to(tl.int64) * C * sac
    w_ptr += g.to(tl.int64) * swg
    e_ptr += g.to(tl.int64) * R * ser
    f_ptr += g.to(tl.int64) * sfg
    y_ptr += g.to(tl.int64) * NO * syc
    b = offs_m // (P1 * P2 * P3)
    q2 = (offs_m // P3) % P2
    q3 = offs_m % P3
    e_row = e_ptr + b.to(tl.int64) * sen + q2 * se2 + q3 * se3
    if D == 3:
        q1 = (offs_m // (P2 * P3)) % P1
        e_row += q1 * se1
    # the rank-R extension of the K loop, first (masked by the dropout keep of y's elements)
    offs_r = tl.arange(0, RP)
    mask_r = offs_r < R
    e = tl.load(e_row[:, None] + offs_r[None, :] * ser, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    f = tl.load(f_ptr + offs_r[:, None] * sfr + offs_n[None, :] * sfn, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    acc = tl.dot(e, f.to(e.dtype), input_precision=PREC)
    if DROPOUT:
        keep = unpack_bits(bits_ptr, offs_m.to(tl.int64), g * NO + offs_n, sbits, mask_m[:, None] & mask_n[None, :])
        acc = tl.where(keep, acc / (1.0 - p), 0.0)
    # the base conv: taps outer, channel blocks inner, flattened into one loop; per row only the
    # sample's offset and the tap-independent part of the source coordinates stay live
    a_row = a_ptr + b.to(tl.int64) * san
    if TRANSPOSED:
        h2 = q2 + pd2
        h3 = q3 + pd3
    else:
        h2 = q2 * st2 - pd2
        h3 = q3 * st3 - pd3
    if D == 3:
        if TRANSPOSED:
            h1 = q1 + pd1
        else:
            h1 = q1 * st1 - pd1
    offs_k = tl.arange(0, BK)
    n_cb = (C + BK - 1) // BK
    for kk in range(K1 * K2 * K3 * n_cb):
        t = kk // n_cb
        c0 = (kk % n_cb) * BK
        k2 = (t // K3) % K2
        k3 = t % K3
        if TRANSPOSED:
            a2 = h2 - k2 * dl2
            a3 = h3 - k3 * dl3
            i2 = a2 // st2
            i3 = a3 // st3
            ok = mask_m & (a2 >= 0) & (a3 >= 0) & (i2 * st2 == a2) & (i3 * st3 == a3) & (i2 < S2) & (i3 < S3)
        else:
            i2 = h2 + k2 * dl2
            i3 = h3 + k3 * dl3
            ok = mask_m & (i2 >= 0) & (i2 < S2) & (i3 >= 0) & (i3 < S3)
        src = i2 * sa2 + i3 * sa3
        w_tap = k2 * sw2 + k3 * sw3
        if D == 3:
            k1 = t // (K2 * K3)
            if TRANSPOSED:
                a1 = h1 - k1 * dl1
                i1 = a1 // st1
                ok = ok & (a1 >= 0) & (i1 * st1 == a1) & (i1 < S1)
            else:
                i1 = h1 + k1 * dl1
                ok = ok & (i1 >= 0) & (i1 < S1)
            src += i1 * sa1
            w_tap += k1 * sw1
        offs_c = c0 + offs_k
        mask_c = offs_c < C
        a = tl.load(a_row[:, None] + src[:, None] + offs_c[None, :] * sac, mask=ok[:, None] & mask_c[None, :], other=0.0)
        w = tl.load(w_ptr + offs_c[:, None] * swk + offs_n[None, :] * swn + w_tap,
                    mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + g * NO + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    b = offs_m // (P1 * P2 * P3)
    q2 = (offs_m // P3) % P2
    q3 = offs_m % P3
    y_row = y_ptr + b.to(tl.int64) * syn + q2 * sy2 + q3 * sy3
    if D == 3:
        y_row += ((offs_m // (P2 * P3)) % P1) * sy1
    tl.store(y_row[:, None] + offs_n[None, :] * syc, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["seed"])  # a random seed: no recompile when it is 1 or a multiple of 16
def _mask_bits_kernel(bits_ptr, L, C, W, p, seed, BL: tl.constexpr, BW: tl.constexpr):
    """bits[n, l, w] = the packed keep mask of channels 32 w .. 32 w + 31 of token l of sample n:
    the draws ``channel_gemm.project`` makes for the element (n, c, l) of an (N, C, L) input."""
    pid = tl.program_id(0).to(tl.int64)
    n_lb = tl.cdiv(L, BL)
    n = pid // n_lb
    offs_l = (pid % n_lb) * BL + tl.arange(0, BL).to(tl.int64)
    offs_w = tl.program_id(1) * BW + tl.arange(0, BW)
    offs_c = tl.program_id(1).to(tl.int64) * BW * 32 + tl.arange(0, BW * 32)
    keep = keep_mask(seed, (n * C + offs_c[None, :]) * L + offs_l[:, None], p) & (offs_c < C)[None, :]
    tl.store(bits_ptr + (n * L + offs_l[:, None]) * W + offs_w[None, :], pack_bits(keep, BL, BW * 32),
             mask=(offs_l < L)[:, None] & (offs_w < W)[None, :])


_igemm_kernel.configs_for = igemm_configs  # compile_check compiles what the pruning keeps per target


# ----------------------------------------------------------------------------- launcher


def unsupported_reason(x_dim: int, spec: ConvSpec, in_per_group: int) -> str | None:
    """Why the implicit-GEMM variant cannot run a conv of this geometry (None: it can).

    ``in_per_group``: the weight's input channels (C_in / groups). Depthwise convs (one input
    channel per group) are refused: every K block would be one channel of BK, every tile
    column block one output channel of BN (the "cudnn" variant runs them)."""
    if x_dim != spec.dims + 2 or spec.dims not in (1, 2, 3):
        return f"the implicit-GEMM conv needs a 1-, 2- or 3-D conv on an input with 2 + dims dims, got {spec.dims}-D on {x_dim}"
    if spec.groups > 1 and in_per_group == 1:
        return f"the implicit-GEMM conv does not serve depthwise convs (groups = {spec.groups}, one input channel per group)"
    return None


def _out_like(shape: Sequence[int], x: Tensor, weight: Tensor) -> Tensor:
    """An empty (N, C, *spatial) tensor, channels-last when x or the weight is (as torch's conv picks)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape))
    cl = fmt is not None and any(t.dim() == len(shape) and not t.is_contiguous() and t.is_contiguous(memory_format=fmt)
                                 for t in (x, weight))
    return torch.empty(tuple(shape), dtype=x.dtype, device=x.device, memory_format=fmt if cl else torch.contiguous_format)


def _dims3(v: Sequence[int], fill: int) -> list[int]:
    """A per-spatial-dim list padded to three dims with leading ``fill``s."""
    return [fill] * (3 - len(v)) + list(v)


def igemm(
    a: Tensor, weight: Tensor, e: Tensor | None, f: Tensor | None, bias: Tensor | None, out: Tensor, stride: list[int],
    pads: list[int], dilation: list[int], transposed: bool, groups: int = 1, p: float = 0.0, bits: Tensor | None = None,
) -> Tensor:
    """Writes the implicit GEMM of the module docstring into ``out`` and returns it (d = 1, 2, 3).

    Forward (``transposed`` False): a = x (N, C_in, *in), out = y (N, C_out, *out), e = u
    (N, G r, *out), f = U_out (C_out, r). Input gradient: a = dy (N, C_out, *out), out = dx
    (N, C_in, *in), e = dz (N, G r, *in), f = U_in (C_in / G, r) shared by the groups, with
    p > 0 the dropout keep mask of dx's elements read from ``bits`` (int32 (N, prod(in),
    ceil(C_in / 32)), as ``channel_gemm.project`` or ``mask_bits`` write it). e = f = None: no
    rank part. weight: (C_out, C_in / G, *kernel); pads: (before, after) per dim, zero padding."""
    nb, no_all = out.shape[0], out.shape[1]
    d = out.dim() - 2
    r = f.shape[1] if f is not None else 0
    torch._check(a.dim() == d + 2 and weight.dim() == d + 2 and 1 <= d <= 3 and (e is None or e.dim() == d + 2),
                 lambda: f"igemm: expected a, weight, e and out of one dim in 3..5, got {a.dim()}, {weight.dim()}, "
                         f"{None if e is None else e.dim()}, {out.dim()}")
    torch._check(no_all % groups == 0 and a.shape[1] % groups == 0,
                 lambda: f"igemm: expected channels divisible by groups = {groups}, got {a.shape[1]} and {no_all}")
    no, c = no_all // groups, a.shape[1] // groups
    torch._check(tuple(weight.shape[:2]) == ((c * groups, no) if transposed else (no * groups, c)),
                 lambda: f"igemm: a {tuple(a.shape)}, weight {tuple(weight.shape)} and out {tuple(out.shape)} do not chain")
    if e is not None and f is not None:
        torch._check(tuple(e.shape) == (nb, groups * r, *out.shape[2:]) and f.shape[0] == (no if transposed else no_all),
                     lambda: f"igemm: expected e {(nb, groups * r, *out.shape[2:])} and f ({no if transposed else no_all}, "
                             f"{r}), got {tuple(e.shape)} and {tuple(f.shape)}")
    torch._check(r <= MAX_RANK, lambda: f"rank: expected <= {MAX_RANK}, got {r}")
    torch._check(max(out.numel(), a.numel()) < 2**31,
                 lambda: f"igemm: expected a and out of < 2^31 elements, got {a.numel()} and {out.numel()}")
    torch._check(a.dtype == weight.dtype, lambda: f"expected x and weight of one dtype, got {a.dtype} and {weight.dtype}")
    length = math.prod(out.shape[2:])
    torch._check(p <= 0 or (bits is not None and bits.dtype == torch.int32 and bits.is_contiguous()
                            and tuple(bits.shape) == (nb, length, mask_words(no_all))),
                 lambda: f"igemm: dropout (p > 0) needs contiguous int32 mask bits {(nb, length, mask_words(no_all))}")
    if out.numel() == 0:
        return out
    if e is None or f is None:
        e, f = out, out.new_empty((0, 0))  # never read: r = 0 masks every load
        se, sf = [0] * 5, [0, 0]
    else:
        e, f = e.to(a.dtype), f.to(a.dtype)
        se, sf = strides3(e), [f.stride(1), f.stride(0)]
    m = nb * length
    sw = strides3(weight)
    swk, swn = (sw[0], sw[1]) if transposed else (sw[1], sw[0])
    swg = (c if transposed else no) * weight.stride(0)  # the group's block of the weight's first dim
    sfg = 0 if transposed else no * sf[1]  # U_in is shared by the groups; U_out has rows per group

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(no, meta["BN"]), groups)

    _igemm_kernel[grid](
        a, weight, e, f, bias if bias is not None else out, bits if p > 0 else out, out,
        m, max(16, triton.next_power_of_2(m)), no, c, r, *_dims3(a.shape[2:], 1), *_dims3(out.shape[2:], 1),
        *_dims3(weight.shape[2:], 1), *_dims3(stride, 1), *_dims3(pads[::2], 0), *_dims3(dilation, 1),
        *strides3(a), swk, swn, *sw[2:], swg, se[0], se[1], *se[2:], *sf, sfg,
        *strides3(out), mask_words(no_all), float(p),
        D=3 if d == 3 else 2, TRANSPOSED=transposed, HAS_BIAS=bias is not None, DROPOUT=p > 0, RP=rank_pad(r),
        PREC=dot_precision(a.dtype),
    )
    return out


def mask_bits(x: Tensor, p: float, seed: int) -> Tensor:
    """The dropout keep mask ``channel_gemm.project`` draws for x (N, C, *spatial) with ``seed``,
    packed: int32 (N, prod(spatial), ceil(C / 32)), bit c % 32 of word c // 32 (any groups)."""
    n, c, length = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    words = mask_words(c)
    bits = torch.empty((n, length, words), dtype=torch.int32, device=x.device)
    if bits.numel():
        bl, bw = block(length, 32 if INTERPRET else 64), min(4, triton.next_power_of_2(words))
        _mask_bits_kernel[(n * triton.cdiv(length, bl), triton.cdiv(words, bw))](
            bits, length, c, words, float(p), int(seed), BL=bl, BW=bw)
    return bits


# ----------------------------------------------------------------------------- custom ops


def _spec(stride: list[int], pads: list[int], dilation: list[int], groups: int, padding_mode: str) -> ConvSpec:
    return ConvSpec(tuple(stride), tuple(zip(pads[::2], pads[1::2])), tuple(dilation), groups, padding_mode)


def _packs_bits(padding_mode: str, p: float) -> bool:
    """Whether the dropout mask is kept packed for the input-gradient GEMM (zero padding; other
    modes add the adapter's dx in a separate pass that redraws the mask from the seed)."""
    return p > 0 and padding_mode == "zeros"


def _fwd_shapes(x: Tensor, weight: Tensor, u_in: Tensor, k: Tensor, spec: ConvSpec) -> tuple[tuple[int, ...], ...]:
    """(y, z, u) shapes of ``conv_igemm_fwd``."""
    n, g = x.shape[0], spec.groups
    out = spec.output_size(x.shape[2:], weight.shape[2:])
    return ((n, weight.shape[0], *out), (n, g * u_in.shape[1], *x.shape[2:]), (n, g * k.shape[0], *out))


def _bits_shape(x: Tensor, packed: bool) -> tuple[int, ...]:
    return (x.shape[0], math.prod(x.shape[2:]), mask_words(x.shape[1])) if packed else (0,)


@torch.library.custom_op("flora_triton::conv_igemm_fwd", mutates_args=())
def conv_igemm_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, u_in: Tensor, k: Tensor, u_out: Tensor, stride: list[int],
    pads: list[int], dilation: list[int], groups: int, padding_mode: str, p: float, seed: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, z, u, bits): z = grouped 1x1 of drop(x) by U_in (N, G r_in, *in), u = grouped conv(z, k)
    (N, G r_out, *out) and y = conv(x, W) + bias + grouped 1x1 of u by U_out (N, C_out, *out), one
    implicit GEMM writing y once; bits the packed int32 keep mask (N, prod(in), ceil(C_in / 32))
    of the dropout with zero padding (else empty: the kernels redraw it from ``seed``).
    x (N, C_in, *in), weight (C_out, C_in / G, *kernel), u_in (C_in / G, r_in) shared by the groups,
    k (r_out, r_in, *kernel) (the scaled core kernel), u_out (C_out, r_out); pads (before, after
    per dim) in ``padding_mode``: a mode other than zeros pads x and z explicitly (F.pad), then
    the convs are valid."""
    spec = _spec(stride, pads, dilation, groups, padding_mode)
    y_shape, z_shape, u_shape = _fwd_shapes(x, weight, u_in, k, spec)
    packed = _packs_bits(padding_mode, p)
    bits = torch.empty(_bits_shape(x, packed and groups == 1), dtype=torch.int32, device=x.device)
    z = cg.project(x, u_in, groups, _out_like(z_shape, x, x), True, p, seed, bits if packed and groups == 1 else None)
    if packed and groups > 1:  # the projection writes the packed mask for one group only
        bits = mask_bits(x, p, seed)
    xa, za = x, z
    if padding_mode != "zeros":
        flat, mode = _explicit_pad(spec)
        xa, za = (F.pad(t, flat, mode=mode) for t in (x, z))
        pads = [0] * len(pads)
    u = core_conv_forward(za, k, stride, pads, dilation, groups, _out_like(u_shape, x, x))
    y = igemm(xa, weight, u, u_out, bias, _out_like(y_shape, x, weight), stride, pads, dilation, False, groups)
    return y, z, u, bits


@fake(conv_igemm_fwd)
def _(x, weight, bias, u_in, k, u_out, stride, pads, dilation, groups, padding_mode, p, seed):  # type: ignore[no-untyped-def]
    y_shape, z_shape, u_shape = _fwd_shapes(x, weight, u_in, k, _spec(stride, pads, dilation, groups, padding_mode))
    return (_out_like(y_shape, x, weight), _out_like(z_shape, x, x), _out_like(u_shape, x, x),
            x.new_empty(_bits_shape(x, _packs_bits(padding_mode, p)), dtype=torch.int32))


@torch.library.custom_op("flora_triton::conv_igemm_bwd", mutates_args=())
def conv_igemm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, u_in: Tensor, k: Tensor, u_out: Tensor, z: Tensor, u: Tensor, bits: Tensor,
    stride: list[int], pads: list[int], dilation: list[int], groups: int, padding_mode: str, p: float, seed: int,
    need_dx: bool, need_du_in: bool, need_dk: bool, need_du_out: bool, need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx like x, dU_in, dK, dU_out, dbias (C_out,)) of ``conv_igemm_fwd``; an empty tensor where not
    asked. Zero padding: dx = base conv's input gradient + mask * grouped 1x1 of dz by U_in in one
    implicit GEMM (written once). Other modes: the base part over the padded input through the
    pad's adjoint, then the adapter part added in place by the expansion kernel."""
    spec = _spec(stride, pads, dilation, groups, padding_mode)
    dx, du_in, dk, du_out, dbias = x.new_empty(0), u_in.new_empty(0), k.new_empty(0), u_out.new_empty(0), dy.new_empty(0)
    mask = bits if _packs_bits(padding_mode, p) else None
    if need_du_out:
        du_out = cg.reduce(dy, u, groups, False).to(u_out.dtype)
    if need_dbias:
        dbias = dy.sum([0, *range(2, dy.dim())])
    need_dz = need_dx or need_du_in
    if need_dz or need_dk:
        du = cg.project(dy, u_out, groups, torch.empty_like(u), False)
        za, cpads = z, pads
        if padding_mode != "zeros":
            flat, mode = _explicit_pad(spec)
            za, cpads = F.pad(z, flat, mode=mode), [0] * len(pads)
        dza, dk_full = core_conv_backward(du, za, k, stride, cpads, dilation, groups,
                                          torch.empty_like(za) if need_dz else None, need_dk)
        dk = dk_full if dk_full is not None else dk
        if need_dz:
            dz = dza if padding_mode == "zeros" else pad_adjoint(dza, spec.pads, padding_mode)
        if need_dx and padding_mode == "zeros":
            dx = igemm(dy, weight, dz, u_in, None, torch.empty_like(x), stride, pads, dilation, True, groups, p, mask)
        elif need_dx:
            xp_shape = (*x.shape[:2], *(n + lo + hi for n, (lo, hi) in zip(x.shape[2:], spec.pads)))
            dxp = igemm(dy, weight, None, None, None, _out_like(xp_shape, x, x), stride, cpads, dilation, True, groups)
            dx = torch.empty_like(x).copy_(pad_adjoint(dxp, spec.pads, padding_mode))
            dx = cg.expand(dz, u_in, groups, dx, dx, True, p, seed)
        if need_du_in:
            du_in = cg.reduce(x, dz, groups, True, p, seed, bits=mask if groups == 1 else None).to(u_in.dtype)
    return dx, du_in, dk, du_out, dbias


@fake(conv_igemm_bwd)
def _(dy, x, weight, u_in, k, u_out, z, u, bits, stride, pads, dilation, groups, padding_mode, p, seed,  # type: ignore[no-untyped-def]
      need_dx, need_du_in, need_dk, need_du_out, need_dbias):
    return (torch.empty_like(x) if need_dx else x.new_empty(0), u_in.new_empty(u_in.shape if need_du_in else (0,)),
            k.new_empty(k.shape if need_dk else (0,)), u_out.new_empty(u_out.shape if need_du_out else (0,)),
            dy.new_empty((dy.shape[1],) if need_dbias else (0,)))


def _igemm_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, weight, bias, u_in, k, u_out, stride, pads, dilation, groups, padding_mode, p, seed = inputs
    ctx.save_for_backward(x, weight, u_in, k, u_out, *output[1:])
    ctx.geometry, ctx.p, ctx.seed = (stride, pads, dilation, groups, padding_mode), p, seed
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _igemm_backward(ctx, dy: Tensor, _dz: Tensor, _du: Tensor, _dbits: Tensor):  # type: ignore[no-untyped-def]
    need_x, _, need_bias, need_uin, need_k, need_uout = ctx.needs_input_grad[:6]
    dx, du_in, dk, du_out, dbias = conv_igemm_bwd(
        dy, *ctx.saved_tensors, *ctx.geometry, ctx.p, ctx.seed, need_x, need_uin, need_k, need_uout, need_bias,
    )
    return (dx if need_x else None, None, dbias.to(ctx.bias_dtype) if need_bias else None, du_in if need_uin else None,
            dk if need_k else None, du_out if need_uout else None) + (None,) * 7


conv_igemm_fwd.register_autograd(_igemm_backward, setup_context=_igemm_setup)

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

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ...convspec import ConvSpec, pad_adjoint
from ..oplib import fake
from . import channel_gemm as cg
from ._common import INTERPRET, MAX_RANK, dot_precision, keep_mask, mask_words, rank_pad, unpack_bits
from .core_conv import strides3, core_conv_backward, core_conv_forward

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
    key=["M_BUCKET", "NO", "C", "K1", "K2", "K3", "sac", "TRANSPOSED", "HAS_BIAS", "DROP", "RP"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _igemm_kernel(
    a_ptr, w_ptr, e_ptr, f_ptr, bias_ptr, bits_ptr, y_ptr,
    M, M_BUCKET, NO, C, R, S1, S2, S3, P1, P2, P3, K1, K2, K3,
    st1, st2, st3, pd1, pd2, pd3, dl1, dl2, dl3,
    san, sac, sa1, sa2, sa3, swk, swn, sw1, sw2, sw3, swg, sen, ser, se1, se2, se3, sfr, sfn, sfg,
    syn, syc, sy1, sy2, sy3, sbits, p, seed,
    TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, DROP: tl.constexpr, RP: tl.constexpr,
    PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[b, g NO + o, q] = bias + keep / (1 - p) * sum_r e[b, g R + r, q] F_g[r, o] + sum_{t, c} A[b, g C + c, src_t(q)] W_{g,t}[c, o].

    Group g = program_id(1). y, e: (NB, G NO | G R, P1, P2, P3); A: (NB, G C, S1, S2, S3), zero
    outside; W_{g,t}[c, o] at g swg + c swk + o swn + k1 sw1 + k2 sw2 + k3 sw3; F_g[r, o] at
    g sfg + r sfr + o sfn. src_t(q) = q st - pad + k dil (forward), or (q + pad - k dil) / st
    where exact (TRANSPOSED). keep: DROP 1 the Philox draw of y's element (its logical index in
    (NB, G NO, P1 P2 P3), as ``keep_mask``), DROP 2 bit o % 32 of the int32 word
    bits[m, o // 32] (m = (b, q) flattened; G = 1). M_BUCKET only keys the autotuner (with sac: the layout)."""
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
    L = P1 * P2 * P3
    b = offs_m // L
    q1 = (offs_m // (P2 * P3)) % P1
    q2 = (offs_m // P3) % P2
    q3 = offs_m % P3
    # the rank-R extension of the K loop, first (masked by the dropout keep of y's elements)
    offs_r = tl.arange(0, RP)
    mask_r = offs_r < R
    e = tl.load(e_ptr + (b.to(tl.int64) * sen + q1 * se1 + q2 * se2 + q3 * se3)[:, None] + offs_r[None, :] * ser,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    f = tl.load(f_ptr + offs_r[:, None] * sfr + offs_n[None, :] * sfn, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    acc = tl.dot(e, f.to(e.dtype), input_precision=PREC)
    if DROP == 1:
        oc = (g * NO + offs_n).to(tl.int64)
        keep = keep_mask(seed, (b.to(tl.int64)[:, None] * (tl.num_programs(1) * NO) + oc[None, :]) * L
                         + (offs_m - b * L)[:, None], p)
        acc = tl.where(keep, acc / (1.0 - p), 0.0)
    elif DROP == 2:
        keep = unpack_bits(bits_ptr, offs_m.to(tl.int64), offs_n, sbits, mask_m[:, None] & mask_n[None, :])
        acc = tl.where(keep, acc / (1.0 - p), 0.0)
    # the base conv: taps outer, channel blocks inner, flattened into one loop; per row only the
    # sample's offset and the tap-independent part of the source coordinates stay live
    a_row = a_ptr + b.to(tl.int64) * san
    if TRANSPOSED:
        h1 = q1 + pd1
        h2 = q2 + pd2
        h3 = q3 + pd3
    else:
        h1 = q1 * st1 - pd1
        h2 = q2 * st2 - pd2
        h3 = q3 * st3 - pd3
    offs_k = tl.arange(0, BK)
    n_cb = (C + BK - 1) // BK
    for kk in range(K1 * K2 * K3 * n_cb):
        t = kk // n_cb
        c0 = (kk % n_cb) * BK
        k1 = t // (K2 * K3)
        k2 = (t // K3) % K2
        k3 = t % K3
        if TRANSPOSED:
            a1 = h1 - k1 * dl1
            a2 = h2 - k2 * dl2
            a3 = h3 - k3 * dl3
            i1 = a1 // st1
            i2 = a2 // st2
            i3 = a3 // st3
            ok = mask_m & (a1 >= 0) & (a2 >= 0) & (a3 >= 0) & (i1 * st1 == a1) & (i2 * st2 == a2) & (i3 * st3 == a3)
            ok = ok & (i1 < S1) & (i2 < S2) & (i3 < S3)
        else:
            i1 = h1 + k1 * dl1
            i2 = h2 + k2 * dl2
            i3 = h3 + k3 * dl3
            ok = mask_m & (i1 >= 0) & (i1 < S1) & (i2 >= 0) & (i2 < S2) & (i3 >= 0) & (i3 < S3)
        offs_c = c0 + offs_k
        mask_c = offs_c < C
        a = tl.load(a_row[:, None] + (i1 * sa1 + i2 * sa2 + i3 * sa3)[:, None] + offs_c[None, :] * sac,
                    mask=ok[:, None] & mask_c[None, :], other=0.0)
        w = tl.load(w_ptr + offs_c[:, None] * swk + offs_n[None, :] * swn + (k1 * sw1 + k2 * sw2 + k3 * sw3),
                    mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + g * NO + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    b = offs_m // L
    q1 = (offs_m // (P2 * P3)) % P1
    q2 = (offs_m // P3) % P2
    q3 = offs_m % P3
    dst = y_ptr + (b.to(tl.int64) * syn + q1 * sy1 + q2 * sy2 + q3 * sy3)[:, None] + offs_n[None, :] * syc
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


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
    seed: int = 0,
) -> Tensor:
    """Writes the implicit GEMM of the module docstring into ``out`` and returns it (d = 1, 2, 3).

    Forward (``transposed`` False): a = x (N, C_in, *in), out = y (N, C_out, *out), e = u
    (N, G r, *out), f = U_out (C_out, r). Input gradient: a = dy (N, C_out, *out), out = dx
    (N, C_in, *in), e = dz (N, G r, *in), f = U_in (C_in / G, r) shared by the groups, with
    p > 0 the dropout keep mask of dx's elements read from ``bits`` (int32 (N, prod(in),
    ceil(C_in / 32)), as ``channel_gemm.project`` writes it; G = 1) or else drawn from ``seed``
    as ``project`` draws it. e = f = None: no rank part. weight: (C_out, C_in / G, *kernel);
    pads: (before, after) per dim, zero padding."""
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
                     lambda: f"igemm: expected e {(nb, groups * r, *out.shape[2:])} and f ({no if transposed else no_all}, {r}), "
                             f"got {tuple(e.shape)} and {tuple(f.shape)}")
    torch._check(r <= MAX_RANK, lambda: f"rank: expected <= {MAX_RANK}, got {r}")
    torch._check(max(out.numel(), a.numel()) < 2**31,
                 lambda: f"igemm: expected a and out of < 2^31 elements, got {a.numel()} and {out.numel()}")
    torch._check(a.dtype == weight.dtype, lambda: f"expected x and weight of one dtype, got {a.dtype} and {weight.dtype}")
    length = math.prod(out.shape[2:])
    torch._check(bits is None or (groups == 1 and bits.dtype == torch.int32 and bits.is_contiguous()
                                  and tuple(bits.shape) == (nb, length, mask_words(no_all))),
                 lambda: f"igemm: packed mask bits need groups = 1 and a contiguous int32 {(nb, length, mask_words(no_all))}")
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
        a, weight, e, f, bias if bias is not None else out, bits if bits is not None else out, out,
        m, max(16, triton.next_power_of_2(m)), no, c, r, *_dims3(a.shape[2:], 1), *_dims3(out.shape[2:], 1),
        *_dims3(weight.shape[2:], 1), *_dims3(stride, 1), *_dims3(pads[::2], 0), *_dims3(dilation, 1),
        *strides3(a), swk, swn, *sw[2:], swg, se[0], se[1], *se[2:], *sf, sfg,
        *strides3(out), mask_words(no_all), float(p), int(seed),
        TRANSPOSED=transposed, HAS_BIAS=bias is not None, DROP=0 if p <= 0 else (2 if bits is not None else 1),
        RP=rank_pad(r), PREC=dot_precision(a.dtype),
    )
    return out


# ----------------------------------------------------------------------------- custom ops


def _spec(stride: list[int], pads: list[int], dilation: list[int], groups: int, padding_mode: str) -> ConvSpec:
    return ConvSpec(tuple(stride), tuple(zip(pads[::2], pads[1::2])), tuple(dilation), groups, padding_mode)


def _packs_bits(groups: int, padding_mode: str, p: float) -> bool:
    """Whether the dropout mask is written packed by the projection and read back (groups = 1,
    zero padding), rather than redrawn from the seed by every kernel that needs it."""
    return p > 0 and groups == 1 and padding_mode == "zeros"


def _fwd_shapes(x: Tensor, weight: Tensor, u_in: Tensor, k: Tensor, spec: ConvSpec) -> tuple[tuple[int, ...], ...]:
    """(y, z, u) shapes of ``conv_igemm_fwd``."""
    n, g = x.shape[0], spec.groups
    out = spec.output_size(x.shape[2:], weight.shape[2:])
    return ((n, weight.shape[0], *out), (n, g * u_in.shape[1], *x.shape[2:]), (n, g * k.shape[0], *out))


def _bits_shape(x: Tensor, packed: bool) -> tuple[int, ...]:
    return (x.shape[0], math.prod(x.shape[2:]), mask_words(x.shape[1])) if packed else (0,)


def _flat_pad(spec: ConvSpec) -> list[int]:
    """F.pad's argument (last dim first) for the spec's pads."""
    return [p for lo_hi in reversed(spec.pads) for p in lo_hi]


@torch.library.custom_op("flora_triton::conv_igemm_fwd", mutates_args=())
def conv_igemm_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, u_in: Tensor, k: Tensor, u_out: Tensor, stride: list[int],
    pads: list[int], dilation: list[int], groups: int, padding_mode: str, p: float, seed: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, z, u, bits): z = grouped 1x1 of drop(x) by U_in (N, G r_in, *in), u = grouped conv(z, k)
    (N, G r_out, *out) and y = conv(x, W) + bias + grouped 1x1 of u by U_out (N, C_out, *out), one
    implicit GEMM writing y once; bits the packed int32 keep mask (N, prod(in), ceil(C_in / 32))
    of the dropout when ``_packs_bits`` (else empty: the kernels redraw it from ``seed``).
    x (N, C_in, *in), weight (C_out, C_in / G, *kernel), u_in (C_in / G, r_in) shared by the groups,
    k (r_out, r_in, *kernel) (the scaled core kernel), u_out (C_out, r_out); pads (before, after
    per dim) in ``padding_mode``: a mode other than zeros pads x and z explicitly (F.pad), then
    the convs are valid."""
    spec = _spec(stride, pads, dilation, groups, padding_mode)
    y_shape, z_shape, u_shape = _fwd_shapes(x, weight, u_in, k, spec)
    packed = _packs_bits(groups, padding_mode, p)
    bits = torch.empty(_bits_shape(x, packed), dtype=torch.int32, device=x.device)
    z = cg.project(x, u_in, groups, _out_like(z_shape, x, x), True, p, seed, bits if packed else None)
    xa, za = x, z
    if padding_mode != "zeros":
        xa, za = (F.pad(t, _flat_pad(spec), mode=padding_mode) for t in (x, z))
        pads = [0] * len(pads)
    u = core_conv_forward(za, k, stride, pads, dilation, groups, _out_like(u_shape, x, x))
    y = igemm(xa, weight, u, u_out, bias, _out_like(y_shape, x, weight), stride, pads, dilation, False, groups)
    return y, z, u, bits


@fake(conv_igemm_fwd)
def _(x, weight, bias, u_in, k, u_out, stride, pads, dilation, groups, padding_mode, p, seed):  # type: ignore[no-untyped-def]
    y_shape, z_shape, u_shape = _fwd_shapes(x, weight, u_in, k, _spec(stride, pads, dilation, groups, padding_mode))
    return (_out_like(y_shape, x, weight), _out_like(z_shape, x, x), _out_like(u_shape, x, x),
            x.new_empty(_bits_shape(x, _packs_bits(groups, padding_mode, p)), dtype=torch.int32))


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
    mask = bits if _packs_bits(groups, padding_mode, p) else None
    if need_du_out:
        du_out = cg.reduce(dy, u, groups, False).to(u_out.dtype)
    if need_dbias:
        dbias = dy.sum([0, *range(2, dy.dim())])
    need_dz = need_dx or need_du_in
    if need_dz or need_dk:
        du = cg.project(dy, u_out, groups, torch.empty_like(u), False)
        za, cpads = z, pads
        if padding_mode != "zeros":
            za, cpads = F.pad(z, _flat_pad(spec), mode=padding_mode), [0] * len(pads)
        dza, dk_full = core_conv_backward(du, za, k, stride, cpads, dilation, groups,
                                          torch.empty_like(za) if need_dz else None, need_dk)
        dk = dk_full if dk_full is not None else dk
        if need_dz:
            dz = dza if padding_mode == "zeros" else pad_adjoint(dza, spec.pads, padding_mode)
        if need_dx and padding_mode == "zeros":
            dx = igemm(dy, weight, dz, u_in, None, torch.empty_like(x), stride, pads, dilation, True, groups, p, mask, seed)
        elif need_dx:
            xp_shape = (*x.shape[:2], *(n + lo + hi for n, (lo, hi) in zip(x.shape[2:], spec.pads)))
            dxp = igemm(dy, weight, None, None, None, _out_like(xp_shape, x, x), stride, cpads, dilation, True, groups)
            dx = torch.empty_like(x).copy_(pad_adjoint(dxp, spec.pads, padding_mode))
            dx = cg.expand(dz, u_in, groups, dx, dx, True, p, seed)
        if need_du_in:
            du_in = cg.reduce(x, dz, groups, True, p, seed, bits=mask).to(u_in.dtype)
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

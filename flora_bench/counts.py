"""Counted FLOPs and bytes behind the achieved TFLOP/s and GB/s figures.

Every figure counts the *useful work* of the layer, not what a given implementation happens
to do, so that TFLOP/s and GB/s compare providers on one scale (higher is better, and
``counted / time`` is proportional to 1 / time). A multiply-add is 2 FLOPs. ``e`` is the
element size of the layer's dtype; adapter parameters are counted at ``e`` too.

Notation. Linear: T tokens, I = in, O = out. Conv2d: T_in = N*H*W input pixels,
T_out = N*H_out*W_out output pixels, C_in, C_out, g groups, c_in = C_in/g, K = k_h*k_w,
|W| = C_out*c_in*K. Ranks r_o (out mode), r_i (in mode), the kernel ranks folded into K.

Base (the frozen layer alone; its weight takes no gradient):

    fwd, infer, merged:  F = 2*T_out*C_out*c_in*K       (Linear: 2*T*I*O)
                         B = e*(T_in*C_in + |W| + T_out*C_out)
    bwd (dx only):       F = same as fwd;  B = e*(T_out*C_out + |W| + T_in*C_in)
    full:                fwd + bwd

Adapter extra (added to the base for every adapted provider): the cheaper of the two
algebraically equal algorithms, per mode, FLOPs only:

    factorized fwd:  Linear 2*T*r_i*(I + O);  Conv 2*T_in*C_in*r_i + 2*T_out*g*r_o*r_i*K
                     + 2*T_out*C_out*r_o   (projection, core conv, expansion)
    factorized bwd:  2x the factorized fwd (each op's grad-input and grad-weight)
    merged fwd:      2*|W|*max(r) (reconstruct dW; the base op runs on W + dW)
    merged bwd:      2*T_out*C_out*c_in*K (dW_eff = dy^T x) + 2*|W|*max(r) (projection)

    Adapter bytes: fwd reads the adapter parameters (P elements); bwd reads them, writes
    their gradients and reads x again for the weight-side gradients: e*(2P + T_in*C_in).
    "infer" counts like fwd; "merged" (inference with merged weights) counts the base only.
"""

from __future__ import annotations

import math

from .shapes import Shape

MODES = ("fwd", "bwd", "full", "infer", "merged")


def _base_fb(s: Shape) -> tuple[float, float, float, float]:
    """(flops of one base op, its minimal bytes, T_in*C_in, T_out*C_out)."""
    e = s.torch_dtype.itemsize
    w = math.prod(s.weight_shape)
    if s.op == "linear":
        xin, yout = s.tokens * s.in_ch, s.tokens * s.out_ch
        flops = 2.0 * s.tokens * s.in_ch * s.out_ch
    else:
        xin = s.batch * s.in_ch * s.hw * s.hw
        yout = s.batch * s.out_ch * s.out_hw * s.out_hw
        flops = 2.0 * yout * (s.in_ch // s.groups) * s.kernel * s.kernel
    return flops, e * (xin + w + yout), xin, yout


def _adapter_params(s: Shape) -> int:
    r = s.ranks
    return math.prod(r) + sum(i * ri for i, ri in zip(s.weight_shape, r))


def _adapter_flops(s: Shape) -> tuple[float, float]:
    """(fwd, bwd) FLOPs of the cheaper adapter algorithm."""
    w = math.prod(s.weight_shape)
    r = s.ranks
    base_flops, _, _, _ = _base_fb(s)
    if s.op == "linear":
        fact = 2.0 * s.tokens * r[1] * (s.in_ch + s.out_ch)
    else:
        t_in = s.batch * s.hw * s.hw
        t_out = s.batch * s.out_hw * s.out_hw
        k = s.kernel * s.kernel
        fact = 2.0 * t_in * s.in_ch * r[1] + 2.0 * t_out * s.groups * r[0] * r[1] * k + 2.0 * t_out * s.out_ch * r[0]
    merged_fwd = 2.0 * w * max(r)
    merged_bwd = base_flops + 2.0 * w * max(r)
    return min(fact, merged_fwd), min(2 * fact, merged_bwd)


def counted(s: Shape, mode: str, adapted: bool) -> tuple[float, float]:
    """(FLOPs, bytes) credited to one call of ``mode`` on shape ``s``.

    ``adapted``: False for the frozen base layer alone, True for every provider that adds
    an adapter (FLoRA, LoRA, the paper formula, compiled paths).
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    e = s.torch_dtype.itemsize
    bf, bb, xin, _ = _base_fb(s)
    fwd_f, fwd_b, bwd_f, bwd_b = bf, bb, bf, bb
    if adapted and mode != "merged":
        af, ab = _adapter_flops(s)
        p = _adapter_params(s)
        fwd_f, fwd_b = bf + af, bb + e * p
        bwd_f, bwd_b = bf + ab, bb + e * (2 * p + xin)
    if mode in ("fwd", "infer", "merged"):
        return fwd_f, fwd_b
    if mode == "bwd":
        return bwd_f, bwd_b
    return fwd_f + bwd_f, fwd_b + bwd_b

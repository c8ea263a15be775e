"""FLoRA ConvNd (d = 1, 2, 3) in Triton: the factorized path (projection, core conv and expansion
kernels). The merged path is the reconstruct kernel + torch's conv, composed in ``backends.merged``.

Factorized, for G groups sharing U_in (Cg, r_in), the core and K; U_out is (C_out, r_out):

    y_base = conv(x, W, bias)                   (N, C_out, *out)       torch (cuDNN)  } conv_base_project
    z      = grouped 1x1 of drop(x) by U_in^T    (N, G r_in, *spatial)  Triton         }
    u      = conv(z, s K, geometry of the base) (N, G r_out, *out)     Triton: core_conv (core_conv.py)
    y      = y_base + grouped 1x1 of u by U_out  (N, C_out, *out)       Triton: conv_expand

K = G x_2 U_k1 ... is folded in torch. Inputs may be NCHW, channels_last or strided; outputs keep
the layout of the tensor they extend. Padding modes other than zeros pad the r-channel z in
torch before the core conv. ``conv_expand`` writes a new output (read
base + write y: the same traffic as an in-place accumulate, which autograd cannot register).
The base conv and the projection share one op so that the backward adds the adapter's dx into
the base conv's input gradient in place, instead of autograd summing two x-sized tensors.
The base weight is frozen: no weight gradient.

Variants (``CONV_VARIANTS``): "cudnn" is the composition above; "igemm" (conv_igemm.py; 1-, 2-
and 3-D, any groups but depthwise, every padding mode) runs the base conv itself as a Triton
implicit GEMM with the expansion as extra K columns, so y is written once (and dx too with
zero padding). Which one runs is the dispatcher's choice (``TritonBackend.variants``: measured
like every other candidate, forced with ``force_dispatch("triton/factorized/igemm")``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...convspec import ConvSpec, conv_nd, conv_nd_backward
from ...tucker import core_kernel
from ..oplib import fake
from . import channel_gemm as cg
from . import conv_igemm as ig
from ._common import alloc_like, new_seed
from .core_conv import core_conv

# ----------------------------------------------------------------------------- helpers


def _spec(stride: list[int], pads: list[int], dilation: list[int], groups: int, padding_mode: str) -> ConvSpec:
    """A ConvSpec from the flat geometry the custom-op schemas carry (pads: before/after per dim)."""
    return ConvSpec(tuple(stride), tuple(zip(pads[::2], pads[1::2])), tuple(dilation), groups, padding_mode)


def _geometry(spec: ConvSpec) -> tuple[list[int], list[int], list[int], int, str]:
    """The inverse of ``_spec``: (stride, flat pads, dilation, groups, padding_mode)."""
    return list(spec.stride), [p for lo_hi in spec.pads for p in lo_hi], list(spec.dilation), spec.groups, spec.padding_mode


@torch.library.custom_op("flora_triton::conv_base_project", mutates_args=())
def conv_base_project(
    x: Tensor, weight: Tensor, bias: Tensor | None, u_in: Tensor, stride: list[int], pads: list[int],
    dilation: list[int], groups: int, padding_mode: str, p: float, seed: int,
) -> tuple[Tensor, Tensor]:
    """(y_base, z): the frozen base conv (torch) and z (N, G r, *spatial) = grouped 1x1 of drop(x) by
    u_in (Cg, r) (Triton). One op so that its backward can add the adapter's dx into the base's."""
    y = conv_nd(x, weight, bias, _spec(stride, pads, dilation, groups, padding_mode))
    z = alloc_like((x.shape[0], groups * u_in.shape[1], *x.shape[2:]), x)
    return y, cg.project(x, u_in, groups, z, True, p, seed)


@fake(conv_base_project)
def _(x, weight, bias, u_in, stride, pads, dilation, groups, padding_mode, p, seed):  # type: ignore[no-untyped-def]
    y = conv_nd(x, weight, bias, _spec(stride, pads, dilation, groups, padding_mode))
    return y, alloc_like((x.shape[0], groups * u_in.shape[1], *x.shape[2:]), x)


@torch.library.custom_op("flora_triton::conv_base_project_bwd", mutates_args=())
def conv_base_project_bwd(
    dy: Tensor, dz: Tensor, x: Tensor, weight: Tensor, u_in: Tensor, stride: list[int], pads: list[int],
    dilation: list[int], groups: int, padding_mode: str, p: float, seed: int, need_dx: bool, need_du: bool,
) -> tuple[Tensor, Tensor]:
    """(dx like x, dU_in (Cg, r)) of ``conv_base_project``; an empty tensor where not asked.

    dx = base conv's input gradient (torch) + mask * grouped 1x1 of dz by U_in, the second added
    in place by the expansion kernel (one read and one write of dx)."""
    dx = du = None
    if need_dx:
        base_dx, _ = conv_nd_backward(dy, x, weight, _spec(stride, pads, dilation, groups, padding_mode), True, False)
        if base_dx.stride() != torch.empty_like(x, device="meta").stride():  # keep the fake's layout
            base_dx = torch.empty_like(x).copy_(base_dx)
        dx = cg.expand(dz, u_in, groups, base_dx, base_dx, True, p, seed)
    if need_du:
        du = cg.reduce(x, dz, groups, True, p, seed).to(u_in.dtype)
    return (dx if dx is not None else x.new_empty(0)), (du if du is not None else u_in.new_empty(0))


@fake(conv_base_project_bwd)
def _(dy, dz, x, weight, u_in, stride, pads, dilation, groups, padding_mode, p, seed, need_dx, need_du):  # type: ignore[no-untyped-def]
    return (torch.empty_like(x) if need_dx else x.new_empty(0)), u_in.new_empty(u_in.shape if need_du else (0,))


def _base_project_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, weight, _bias, u_in, *geometry, p, seed = inputs
    ctx.save_for_backward(x, weight, u_in)
    ctx.geometry, ctx.p, ctx.seed = geometry, p, seed


def _base_project_backward(ctx, dy: Tensor, dz: Tensor):  # type: ignore[no-untyped-def]
    x, weight, u_in = ctx.saved_tensors
    need_x, _, need_bias, need_u = ctx.needs_input_grad[:4]
    dx = du = None
    if need_x or need_u:
        dx, du = conv_base_project_bwd(dy, dz, x, weight, u_in, *ctx.geometry, ctx.p, ctx.seed, need_x, need_u)
    dbias = dy.sum([0, *range(2, dy.dim())]) if need_bias else None
    return (dx if need_x else None, None, dbias, du if need_u else None) + (None,) * 7


conv_base_project.register_autograd(_base_project_backward, setup_context=_base_project_setup)


@torch.library.custom_op("flora_triton::conv_expand", mutates_args=())
def conv_expand(base: Tensor, u: Tensor, u_out: Tensor, groups: int) -> Tensor:
    """y = base + grouped 1x1 of u (N, G r, *out) by u_out (C_out, r): (N, C_out, *out), base's layout."""
    return cg.expand(u, u_out, groups, torch.empty_like(base), base, False)


@fake(conv_expand)
def _(base: Tensor, u: Tensor, u_out: Tensor, groups: int) -> Tensor:
    return torch.empty_like(base)


@torch.library.custom_op("flora_triton::conv_expand_bwd", mutates_args=())
def conv_expand_bwd(dy: Tensor, u: Tensor, u_out: Tensor, groups: int, need_du: bool, need_dw: bool) -> tuple[Tensor, Tensor]:
    """(du like u, dU_out (C_out, r)) of ``conv_expand``; an empty tensor where not asked."""
    du = cg.project(dy, u_out, groups, torch.empty_like(u), False) if need_du else u.new_empty(0)
    dw = cg.reduce(dy, u, groups, False).to(u_out.dtype) if need_dw else u_out.new_empty(0)
    return du, dw


@fake(conv_expand_bwd)
def _(dy, u, u_out, groups, need_du, need_dw):  # type: ignore[no-untyped-def]
    return (torch.empty_like(u) if need_du else u.new_empty(0)), u_out.new_empty(u_out.shape if need_dw else (0,))


def _expand_setup(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    _base, u, u_out, groups = inputs
    ctx.save_for_backward(u, u_out)
    ctx.groups = groups


def _expand_backward(ctx, dy: Tensor):  # type: ignore[no-untyped-def]
    u, u_out = ctx.saved_tensors
    need_base, need_u, need_w = ctx.needs_input_grad[:3]
    du = dw = None
    if need_u or need_w:
        du, dw = conv_expand_bwd(dy, u, u_out, ctx.groups, need_u, need_w)
    return dy if need_base else None, du if need_u else None, dw if need_w else None, None


conv_expand.register_autograd(_expand_backward, setup_context=_expand_setup)


# ----------------------------------------------------------------------------- entry points


#: The implementations of the factorized conv: cuDNN base conv + Triton passes, or one implicit GEMM.
CONV_VARIANTS = ("cudnn", "igemm")


def conv_factorized(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor], scale: float,
    spec: ConvSpec, dropout_p: float, variant: str = "cudnn",
) -> Tensor:
    """x (N, C_in, *spatial) -> (N, C_out, *out): conv(x, W, b) + conv(drop(x), dW), in x's dtype.

    ``variant``: one of ``CONV_VARIANTS``."""
    dt = x.dtype
    fs = [f.to(dt) for f in factors]
    k = core_kernel(core.to(dt), fs, scale)
    seed = new_seed() if dropout_p > 0 else 0
    stride, pads, dilation, g, mode = _geometry(spec)
    if variant not in CONV_VARIANTS:
        raise ValueError(f"conv variant: expected one of {CONV_VARIANTS}, got {variant!r}")
    if variant == "igemm":
        why = ig.unsupported_reason(x.dim(), spec, weight.shape[1])
        if why is not None:
            raise ValueError(f"conv variant 'igemm' was requested, but {why} (use 'cudnn')")
        return ig.conv_igemm_fwd(x, weight, bias, fs[1], k, fs[0], stride, pads, dilation, g, mode, dropout_p, seed)[0]
    y_base, z = conv_base_project(x, weight, bias, fs[1], stride, pads, dilation, g, mode, dropout_p, seed)
    if mode != "zeros":  # other padding modes: pad the r-channel z in torch, then a valid conv
        z = F.pad(z, [p for lo_hi in reversed(spec.pads) for p in lo_hi], mode=mode)
        pads = [0] * len(pads)
    u = core_conv(z, k, stride, pads, dilation, g)
    return conv_expand(y_base, u, fs[0], g)

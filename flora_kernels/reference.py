"""Pure-PyTorch FLoRA layers: the CPU fallback and the oracle every kernel is tested against.

Both strategies compute ``base(x) + op(dropout(x), dW)`` with
``dW = scale * core x_0 U_0 ... x_{N-1} U_{N-1}`` (docs/ARCHITECTURE.md, Conventions):

- factorized (input path): for Linear, shrink the input by U_in, apply the core, expand by
  U_out into the base output; for ConvNd, the folded form: A = core x_1 U_in x_2 U_2 ... (tiny,
  per call), conv(dropout(x), A) with the base stride/padding/dilation/groups, expand by U_out
  into the base output. dW is never materialized.
- merged (weight path): ``op(x, W + dW)``; with active dropout ``op(x, W) + op(dropout(x), dW)``.

Dtypes: the adapter path computes in the input's dtype (adapter parameters are cast to it);
the merged path reconstructs dW in the adapter parameters' dtype, then casts it to the
weight's dtype before adding. Autograd is PyTorch's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .convspec import ConvSpec, conv_nd, pointwise_conv
from .tucker import core_kernel, input_fold


def in_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in ``dtype`` (t itself when it already is: no dispatch on the per-call path)."""
    return t if t.dtype == dtype else t.to(dtype)


def _dropout(x: Tensor, p: float) -> Tensor:
    return F.dropout(x, p, training=True) if p > 0 else x


def linear_merged(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
    scale: float, dropout_p: float = 0.0,
) -> Tensor:
    """x: (..., in); weight: (out, in); core: (r_out, r_in); factors: (out, r_out), (in, r_in).
    Returns (..., out): the merged strategy (``backends.merged``) over the pure-PyTorch reconstruct."""
    from .backends import merged
    from .backends.base import load_backend

    return merged.linear(load_backend("reference"), x, weight, bias, core, factors, scale, dropout_p)  # type: ignore[arg-type]


def linear_factorized(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
    scale: float, dropout_p: float = 0.0,
) -> Tensor:
    """``x W^T + b + ((dropout(x) U_in) (s G^T)) U_out^T``; same shapes as ``linear_merged``.

    The core is folded into the expansion: B = s U_out G (out, r_in), so the adapter costs two
    skinny GEMMs, x U_in and S B^T.
    """
    u_out, u_in = (in_dtype(f, x.dtype) for f in factors)
    b = (u_out @ in_dtype(core, x.dtype)) * scale
    s = _dropout(x, dropout_p) @ u_in
    y = F.linear(x, weight, bias)
    if y.dim() == 2:  # in place on y itself: autograd has no view to rebase (a CopySlices node less)
        return y.addmm_(s, b.t())
    y.view(-1, y.shape[-1]).addmm_(s.reshape(-1, s.shape[-1]), b.t())  # one pass over y
    return y


def conv_merged(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
    scale: float, spec: ConvSpec, dropout_p: float = 0.0,
) -> Tensor:
    """x: (N, C_in, *spatial); weight: (C_out, C_in/groups, *kernel); core: ranks (N = 2 + d);
    factors[0]: (C_out, r_out), factors[1]: (C_in/groups, r_in), factors[2+j]: (k_j, r_k_j).
    Returns (N, C_out, *out_spatial): the merged strategy (``backends.merged``) over the
    pure-PyTorch reconstruct."""
    from .backends import merged
    from .backends.base import load_backend

    return merged.conv(load_backend("reference"), x, weight, bias, core, factors, scale, spec, dropout_p)  # type: ignore[arg-type]


def _pointwise(x: Tensor, w: Tensor) -> Tensor:
    """Per-group 1x1 map as a GEMM: x (N, g*I, *sp), w (g, O, I) -> (N, g*O, *sp).

    channels_last inputs (g = 1) stay channels_last: one (N*P, I) x (I, O) GEMM on the
    channels-minor view. Otherwise a batched (O, I) x (I, P) GEMM on the NCHW view.
    """
    n, (g, o, i) = x.shape[0], w.shape
    if g == 1 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous():
        return (x.movedim(1, -1) @ w[0].t()).movedim(-1, 1)
    return (w @ x.reshape(n, g, i, -1)).reshape(n, g * o, *x.shape[2:])


def conv_factorized(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
    scale: float, spec: ConvSpec, dropout_p: float = 0.0,
) -> Tensor:
    """``conv(x, W) + b + s * U_out . conv(dropout(x), A)`` with A = core x_1 U_in x_2 U_2 ... the
    core folded with every factor but the output one (``tucker.input_fold``): the conv's own
    geometry maps C_in/groups channels to r_out, then a grouped 1x1 conv by U_out expands them.
    Same shapes as ``conv_merged``; every group uses the same factors and core.

    Autograd keeps dropout(x) and the r_out-channel activation, as LoRA's two convs do. The fold
    costs a few tiny GEMMs per call, independent of the batch.
    """
    fs = [in_dtype(f, x.dtype) for f in factors]
    a = input_fold(in_dtype(core, x.dtype), fs)  # (r_out, C_in/g, *k)
    return conv_folded(x, _dropout(x, dropout_p), weight, bias, a, fs[0], scale, spec)


def conv_folded(
    x: Tensor, xa: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, u_out: Tensor, scale: float, spec: ConvSpec,
) -> Tensor:
    """``conv(x, W) + b + s * U_out . conv(xa, A)`` for the adapter's input xa (x, or its dropped
    copy), a folded A (r_out, C_in/g, *k) and u_out (C_out, r_out) in x's dtype: the conv through A
    (repeated per group), then the grouped 1x1 conv by U_out accumulated into the base output
    (scale as the accumulation's alpha)."""
    g, d = spec.groups, spec.dims
    h = conv_nd(xa, a.repeat(g, *(1,) * (d + 1)) if g > 1 else a, None, spec)
    y = conv_nd(x, weight, bias, spec)
    return y.add_(pointwise_conv(h, u_out.view(*u_out.shape, *(1,) * d), g), alpha=scale)


def embedding_factorized(
    ids: Tensor, core: Tensor, factors: Sequence[Tensor], scale: float, padding_idx: int | None,
    scale_grad_by_freq: bool, dtype: torch.dtype,
) -> Tensor:
    """The adapter's rows of an embedding without building dW: ``(U_0[ids] (s G)) U_1^T``.

    ids: (...) integer; core: (r_0, r_1); factors: (num_embeddings, r_0), (dim, r_1).
    Returns (..., dim) in ``dtype``, zero where ``ids == padding_idx``.
    """
    u0, u1 = (f.to(dtype) for f in factors)
    rows = F.embedding(ids, u0, padding_idx, None, 2.0, scale_grad_by_freq)
    out = (rows @ (core.to(dtype) * scale)) @ u1.t()
    if padding_idx is not None:
        out = out * (ids != padding_idx).unsqueeze(-1).to(dtype)
    return out


def conv_transpose_factorized(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor], scale: float,
    stride: tuple[int, ...], padding: tuple[int, ...], output_padding: tuple[int, ...], groups: int,
    dilation: tuple[int, ...], dropout_p: float = 0.0,
) -> Tensor:
    """conv_transpose(x, W, b) + conv_transpose(dropout(x), dW) without building dW.

    x: (N, C_in, *spatial); weight: (C_in, C_out/groups, *kernel); core: (r_in, r_out,
    *kernel_ranks); factors: (C_in, r_in), (C_out/groups, r_out), (k_j, rk_j). Projection by
    each group's rows of U_in (1x1), the transposed core conv K = s G x_2 U_2 ... (grouped,
    base geometry), expansion by U_out (1x1, shared by the groups), added into the base output.
    Returns (N, C_out, *out_spatial).
    """
    d, g = weight.dim() - 2, groups
    convt = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[d - 1]
    u_in, u_out = factors[0].to(x.dtype), factors[1].to(x.dtype)
    r_in, r_out = core.shape[0], core.shape[1]
    k = core_kernel(core.to(x.dtype), [f.to(x.dtype) for f in factors], scale)
    y = convt(x, weight, bias, stride, padding, output_padding, g, dilation)
    z = _pointwise(_dropout(x, dropout_p), u_in.reshape(g, -1, r_in).transpose(1, 2))
    u = convt(z, k.repeat(g, *(1,) * (d + 1)) if g > 1 else k, None, stride, padding, output_padding, g, dilation)
    return y.add_(_pointwise(u, u_out.expand(g, -1, r_out)))


def linear_delta(x: Tensor, core: Tensor, factors: Sequence[Tensor], scale: float, dropout_p: float = 0.0) -> Tensor:
    """The adapter's term alone, ``((dropout(x) U_in) (s G^T)) U_out^T``, in x's dtype.

    x: (..., in); core: (r_out, r_in); factors: (out, r_out), (in, r_in). Returns (..., out).
    Autograd keeps S = dropout(x) U_in (..., r_in) for the expansion's gradient, and keeps x
    only when U_in requires grad.
    """
    u_out, u_in = (f.to(x.dtype) for f in factors)
    b = (u_out @ core.to(x.dtype)) * scale
    return (_dropout(x, dropout_p) @ u_in) @ b.t()

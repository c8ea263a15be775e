"""Pure-PyTorch FLoRA layers: the CPU fallback and the oracle every kernel is tested against.

Both strategies compute ``base(x) + op(dropout(x), dW)`` with
``dW = scale * core x_0 U_0 ... x_{N-1} U_{N-1}`` (DESIGN.md section 2):

- factorized (input path): shrink the input by U_in, apply the small core map (a matrix for
  Linear, a core conv for ConvNd carrying the base stride/padding/dilation/groups), expand by
  U_out and add into the base output. dW is never materialized.
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

from .convspec import ConvSpec, conv_nd
from .tucker import mode_n_product, tucker_reconstruct


def _dropout(x: Tensor, p: float) -> Tensor:
    return F.dropout(x, p, training=True) if p > 0 else x


def linear_merged(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
    scale: float, dropout_p: float = 0.0,
) -> Tensor:
    """x: (..., in); weight: (out, in); core: (r_out, r_in); factors: (out, r_out), (in, r_in).

    Returns (..., out).
    """
    delta = tucker_reconstruct(core, factors, scale).to(weight.dtype)
    if dropout_p > 0:
        return F.linear(x, weight, bias) + F.linear(_dropout(x, dropout_p), delta)
    return F.linear(x, weight + delta, bias)


def linear_factorized(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
    scale: float, dropout_p: float = 0.0,
) -> Tensor:
    """``x W^T + b + ((dropout(x) U_in) (s G^T)) U_out^T``; same shapes as ``linear_merged``.

    The core is folded into the expansion: B = s U_out G (out, r_in), so the adapter costs two
    skinny GEMMs, x U_in and S B^T.
    """
    u_out, u_in = (f.to(x.dtype) for f in factors)
    b = (u_out @ core.to(x.dtype)) * scale
    s = _dropout(x, dropout_p) @ u_in
    return F.linear(x, weight, bias) + s @ b.t()


def core_kernel(core: Tensor, factors: Sequence[Tensor], scale: float = 1.0) -> Tensor:
    """The core conv kernel K = s * G x_2 U_2 ... x_{N-1} U_{N-1}: (r_out, r_in, *kernel)."""
    k = core
    for n in range(2, core.dim()):
        k = mode_n_product(k, factors[n], n)
    return k * scale if scale != 1.0 else k


def conv_merged(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
    scale: float, spec: ConvSpec, dropout_p: float = 0.0,
) -> Tensor:
    """x: (N, C_in, *spatial); weight: (C_out, C_in/groups, *kernel); core: ranks (N = 2 + d);
    factors[0]: (C_out, r_out), factors[1]: (C_in/groups, r_in), factors[2+j]: (k_j, r_k_j).

    Returns (N, C_out, *out_spatial).
    """
    # Canonical strides: size-1 kernel dims otherwise get strides that differ between eager and
    # torch.compile's fake tensors, which breaks the compiled backward.
    delta = tucker_reconstruct(core, factors, scale).to(weight.dtype).clone(memory_format=torch.contiguous_format)
    if dropout_p > 0:
        return conv_nd(x, weight, bias, spec) + conv_nd(_dropout(x, dropout_p), delta, None, spec)
    return conv_nd(x, weight + delta, bias, spec)


def conv_factorized(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
    scale: float, spec: ConvSpec, dropout_p: float = 0.0,
) -> Tensor:
    """Projection (grouped 1x1 by U_in^T) -> core conv K (grouped, base geometry) ->
    expansion (grouped 1x1 by U_out), added into the base output. Same shapes as
    ``conv_merged``. Each group uses the same factors and core.
    """
    g, d = spec.groups, spec.dims
    ones = (1,) * d
    u_out, u_in = factors[0].to(x.dtype), factors[1].to(x.dtype)
    r_out, r_in = core.shape[0], core.shape[1]
    k = core_kernel(core.to(x.dtype), [f.to(x.dtype) for f in factors], scale)
    one_by_one = ConvSpec(ones, tuple((0, 0) for _ in ones), ones, g, "zeros")
    w_proj = u_in.t().reshape(r_in, u_in.shape[0], *ones)
    w_core = k
    if g > 1:
        w_proj = w_proj.repeat(g, *(1,) * (d + 1))
        w_core = k.repeat(g, *(1,) * (d + 1))
    z = conv_nd(_dropout(x, dropout_p), w_proj, None, one_by_one)
    u = conv_nd(z, w_core, None, spec)
    y_adapter = conv_nd(u, u_out.reshape(u_out.shape[0], r_out, *ones), None, one_by_one)
    return conv_nd(x, weight, bias, spec) + y_adapter

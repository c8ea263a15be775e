"""The merged strategy, composed once over any backend's reconstruct.

    linear: F.linear(x, W + s dW, b)               conv: convNd(x, W + s dW, b)
    with dropout p > 0: op(x, W, b) + op(dropout(x), s dW)   (the two cannot fold)

``W + s dW`` comes from the backend's differentiable ``reconstruct``; torch's own op then gives
dW_eff = dy^T x in backward, which the reconstruct's backward projects onto the core and factors.
A conv without dropout is the backend's ``merged_conv``: that composition by default, one op of
its own where it has one (the cpp backend's ``flora::conv_merged``). A backend serves the merged
strategy exactly when it serves that reconstruct.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from ..convspec import ConvSpec, canonical_weight, conv_nd
from .base import Backend


def _dropout(x: Tensor, p: float) -> Tensor:
    return F.dropout(x, p, training=True)


def linear(
    b: Backend, x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
    scale: float, dropout_p: float,
) -> Tensor:
    """x (..., in), weight (out, in), core (r_out, r_in), factors (out, r_out), (in, r_in) -> (..., out)."""
    if dropout_p > 0:
        delta = b.reconstruct(core, factors, scale, None).to(weight.dtype)  # type: ignore[attr-defined]
        return F.linear(x, weight, bias) + F.linear(_dropout(x, dropout_p), delta)
    return F.linear(x, b.reconstruct(core, factors, scale, weight), bias)  # type: ignore[attr-defined]


def conv(
    b: Backend, x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
    scale: float, spec: ConvSpec, dropout_p: float,
) -> Tensor:
    """x (N, C_in, *sp), weight (C_out, C_in/g, *k), core (r_out, r_in, *r_k) -> (N, C_out, *out_sp)."""
    if dropout_p > 0:
        delta = canonical_weight(b.reconstruct(core, factors, scale, None).to(weight.dtype))  # type: ignore[attr-defined]
        return conv_nd(x, weight, bias, spec) + conv_nd(_dropout(x, dropout_p), delta, None, spec)
    return b.merged_conv(x, weight, bias, core, factors, scale, spec)

"""The merged strategy's depthwise 2-D conv on CPU, with the extension's weight gradient.

The merged strategy runs ``conv2d(x, W + s dW)`` and needs dW_eff, the conv's weight gradient,
which ATen's CPU depthwise backward computes slowly at ConvNeXt-style 7x7 shapes (3-13x the
extension's kernel, docs/kernels/cuda.md, "CPU kernels"). ``conv`` gives the same forward and
input/bias gradients as ``conv_nd`` (ATen's), and the weight gradient from
``torch.ops.flora.depthwise_conv2d_weight_grad``. Measured dispatch decides, per layer, whether
the cpp backend's merged path (which uses it) beats the reference's (which does not).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...convspec import ConvSpec, conv_nd, conv_nd_backward
from ..base import autocast_dtype


def eligible(x: Tensor, weight: Tensor, spec: ConvSpec) -> bool:
    """A 2-D CPU conv with one input channel per group (depthwise, any channel multiplier),
    symmetric zero padding, and a weight that needs its gradient."""
    return (
        spec.dims == 2 and weight.dim() == 4 and weight.shape[1] == 1 and spec.groups == x.shape[1] > 1
        and spec.symmetric_zero_padding is not None and x.device.type == "cpu" and weight.requires_grad
        and torch.is_grad_enabled()
    )


class _DepthwiseConv2d(torch.autograd.Function):
    """``conv_nd`` (an eligible depthwise conv) with the extension's weight gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, spec: ConvSpec) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.spec, ctx.has_bias = spec, bias is not None
        return conv_nd(x, weight, bias, spec)

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        spec = ctx.spec
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = conv_nd_backward(dy, x, weight, spec, True, False)[0] if need_x else None
        dw = None
        if need_w:
            dw = torch.ops.flora.depthwise_conv2d_weight_grad(
                x, dy, list(weight.shape[2:]), list(spec.stride), list(spec.symmetric_zero_padding), list(spec.dilation))
        db = dy.sum((0, 2, 3)) if need_b and ctx.has_bias else None
        return dx, dw, db, None


def conv(x: Tensor, weight: Tensor, bias: Tensor | None, spec: ConvSpec) -> Tensor:
    """x (N, C, H, W), weight (C * m, 1, kh, kw) -> (N, C * m, H_out, W_out); ``conv_nd`` where
    not ``eligible``."""
    if not eligible(x, weight, spec):
        return conv_nd(x, weight, bias, spec)
    ac = autocast_dtype("cpu")
    if ac is not None:  # what autocast does to a conv: every operand in its dtype
        with torch.autocast("cpu", enabled=False):
            return conv(x.to(ac), weight.to(ac), None if bias is None else bias.to(ac), spec)
    return _DepthwiseConv2d.apply(x, weight, bias, spec)

"""Normalized convolution options, shared by every path (reference, Triton, C++)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

IntOrTuple = int | Sequence[int]


def _tuple(v: IntOrTuple, d: int, name: str) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * d
    t = tuple(int(x) for x in v)
    if len(t) == 1:
        return t * d
    if len(t) != d:
        raise ValueError(f"{name}: expected an int or {d} ints for a {d}-D conv, got {tuple(v)}")
    return t


@dataclass(frozen=True)
class ConvSpec:
    """A ConvNd's geometry with padding resolved to explicit amounts per side.

    ``pads`` holds (before, after) per spatial dim, in dim order. ``padding_mode`` is one of
    ``PADDING_MODES``.
    """

    stride: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    #: the number of spatial dims (derived once: read on every call)
    dims: int = field(init=False, compare=False, repr=False)
    #: the per-dim padding if it can be handed to F.convNd directly, else None (derived once)
    symmetric_zero_padding: tuple[int, ...] | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        sym = self.padding_mode == "zeros" and all(lo == hi for lo, hi in self.pads)
        object.__setattr__(self, "dims", len(self.stride))
        object.__setattr__(self, "symmetric_zero_padding", tuple(lo for lo, _ in self.pads) if sym else None)

    @staticmethod
    def make(
        kernel_size: Sequence[int],
        stride: IntOrTuple = 1,
        padding: IntOrTuple | str = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> ConvSpec:
        d = len(kernel_size)
        stride_t, dil_t = _tuple(stride, d, "stride"), _tuple(dilation, d, "dilation")
        if any(s < 1 for s in stride_t) or any(x < 1 for x in dil_t):
            raise ValueError(f"stride and dilation must be >= 1, got stride={stride_t}, dilation={dil_t}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode: expected one of {PADDING_MODES}, got {padding_mode!r}")
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups: expected an int >= 1, got {groups!r}")
        if isinstance(padding, str):
            if padding == "valid":
                pads = tuple((0, 0) for _ in range(d))
            elif padding == "same":
                if any(s != 1 for s in stride_t):
                    raise ValueError(f"padding='same' needs stride 1, got stride={stride_t}")
                pads = tuple(
                    ((dl * (k - 1)) // 2, dl * (k - 1) - (dl * (k - 1)) // 2)
                    for k, dl in zip(kernel_size, dil_t)
                )
            else:
                raise ValueError(f"padding: expected an int, a tuple, 'same' or 'valid', got {padding!r}")
        else:
            p = _tuple(padding, d, "padding")
            if any(x < 0 for x in p):
                raise ValueError(f"padding must be >= 0, got {p}")
            pads = tuple((x, x) for x in p)
        return ConvSpec(stride_t, pads, dil_t, groups, padding_mode)

    @staticmethod
    def of(conv: torch.nn.modules.conv._ConvNd) -> ConvSpec:
        """The spec of an existing ``nn.ConvNd`` module."""
        return ConvSpec.make(
            conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode
        )

    def output_size(self, in_size: Sequence[int], kernel_size: Sequence[int]) -> tuple[int, ...]:
        return tuple(
            (i + lo + hi - dl * (k - 1) - 1) // s + 1
            for i, (lo, hi), dl, k, s in zip(in_size, self.pads, self.dilation, kernel_size, self.stride)
        )


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_nd(x: Tensor, weight: Tensor, bias: Tensor | None, spec: ConvSpec) -> Tensor:
    """``F.convNd`` with the spec's stride, padding (any mode, asymmetric too), dilation, groups.

    Args:
        x: (N, C_in, *spatial).
        weight: (C_out, C_in / groups, *kernel).
    """
    x, padding = conv_input(x, spec)
    return _CONV[spec.dims](x, weight, bias, spec.stride, padding, spec.dilation, spec.groups)


def canonical_weight(w: Tensor) -> Tensor:
    """``w`` with row-major strides. Size-1 kernel dims otherwise carry strides that differ between
    eager and torch.compile's fake tensors, which breaks the compiled conv backward."""
    want, acc = [], 1
    for s in reversed(w.shape):
        want.append(acc)
        acc *= s
    if tuple(w.stride()) == tuple(reversed(want)):
        return w
    return w.clone(memory_format=torch.contiguous_format)


def conv_input(x: Tensor, spec: ConvSpec) -> tuple[Tensor, tuple[int, ...]]:
    """(input, padding) that give the spec's conv of x with F.convNd's zero padding: x and the spec's
    symmetric zero padding, or x padded explicitly (any mode, asymmetric) and no padding."""
    sym = spec.symmetric_zero_padding
    if sym is not None:
        return x, sym
    flat, mode = _explicit_pad(spec)
    return F.pad(x, flat, mode=mode), (0,) * spec.dims


def pointwise_conv(x: Tensor, weight: Tensor, groups: int = 1) -> Tensor:
    """A 1x1 conv (stride 1, no padding) of x (N, C_in, *spatial) by weight (C_out, C_in / groups, 1, ...)."""
    return _CONV[x.dim() - 2](x, weight, None, 1, 0, 1, groups)


def _explicit_pad(spec: ConvSpec) -> tuple[tuple[int, ...], str]:
    """F.pad's arguments for the spec's padding (last dim first) and mode."""
    flat = tuple(p for lo_hi in reversed(spec.pads) for p in lo_hi)
    return flat, "constant" if spec.padding_mode == "zeros" else spec.padding_mode


def pad_adjoint(g: Tensor, pads: Sequence[tuple[int, int]], mode: str) -> Tensor:
    """The adjoint of F.pad (per spatial dim (before, after), any padding mode) applied to g."""
    for j, (lo, hi) in enumerate(pads):
        dim, n = 2 + j, g.shape[2 + j] - lo - hi
        inner = g.narrow(dim, lo, n)
        if mode != "zeros" and (lo or hi):
            inner = inner.clone()
            before, after = g.narrow(dim, 0, lo), g.narrow(dim, lo + n, hi)
            if mode == "circular":  # before[k] is x[n - lo + k], after[k] is x[k]
                inner.narrow(dim, n - lo, lo).add_(before)
                inner.narrow(dim, 0, hi).add_(after)
            elif mode == "replicate":  # every pad position copies the edge
                inner.narrow(dim, 0, 1).add_(before.sum(dim, keepdim=True))
                inner.narrow(dim, n - 1, 1).add_(after.sum(dim, keepdim=True))
            else:  # reflect: before[k] is x[lo - k], after[k] is x[n - 2 - k]
                inner.narrow(dim, 1, lo).add_(before.flip(dim))
                inner.narrow(dim, n - 1 - hi, hi).add_(after.flip(dim))
        g = inner
    return g


def _memory_format(x: Tensor) -> torch.memory_format:
    """x's suggested memory format (``suggest_memory_format`` without reading ``x.layout``, which
    torch.compile's strict tracing of a backward rejects)."""
    if x.dim() in (4, 5) and torch._prims_common.are_strides_like_channels_last_or_false(x.shape, x.stride()):
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def conv_nd_backward(
    dy: Tensor, x: Tensor, weight: Tensor, spec: ConvSpec, need_x: bool, need_w: bool
) -> tuple[Tensor | None, Tensor | None]:
    """(dx, dweight) of ``conv_nd(x, weight, ., spec)`` for the output gradient dy (None where not
    asked): torch's convolution backward (cuDNN on CUDA). With symmetric zero padding dx is in x's
    layout as torch returns it (contiguous or channels_last); otherwise it goes through the adjoint
    of the explicit padding and is returned dense in x's suggested memory format."""
    zeros = [0] * spec.dims
    sym = spec.symmetric_zero_padding
    if sym is not None:
        dx, dw, _ = torch.ops.aten.convolution_backward(
            dy, x, weight, None, list(spec.stride), list(sym), list(spec.dilation), False, zeros, spec.groups,
            [need_x, need_w, False])
        return dx, dw
    flat, mode = _explicit_pad(spec)
    shape = (*x.shape[:2], *(n + lo + hi for n, (lo, hi) in zip(x.shape[2:], spec.pads)))
    fmt = _memory_format(x)
    xp = F.pad(x, flat, mode=mode) if need_w else x.new_empty(shape).contiguous(memory_format=fmt)
    gp, dw, _ = torch.ops.aten.convolution_backward(
        dy, xp, weight, None, list(spec.stride), zeros, list(spec.dilation), False, zeros, spec.groups,
        [need_x, need_w, False])
    dx = pad_adjoint(gp, spec.pads, spec.padding_mode).contiguous(memory_format=fmt) if need_x else None
    return dx, dw

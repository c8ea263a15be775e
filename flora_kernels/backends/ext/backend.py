"""``ExtBackend``: what the extension's two backends share (the ``Backend`` contract over the
ops of ``ops.py``). Device-specific choices live in ``CppBackend`` (cpp.py) and ``CudaBackend``
(cuda.py), e.g. the order of the projection's GEMMs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ...convspec import ConvSpec, conv_nd
from ...reference import in_dtype
from ...tucker import core_kernel
from ..base import Backend, Call, TensorSpec, autocast_dtype
from .build import load_extension
from .ops import BaseConvShrink, ConvFused, Expand, Reconstruct, flora

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def conv_core(core: Tensor, factors: Sequence[Tensor], groups: int) -> Tensor:
    """The core conv's kernel K = core x_2 U_2 ... (r_out, r_in, *k), repeated per group: (g r_out, r_in, *k)."""
    k = core_kernel(core, factors)
    return k.repeat(groups, *(1,) * (k.dim() - 1)) if groups > 1 else k


# The fused core-conv ops keep a 64-token x 32-channel tile of u (forward) / dz (backward) in the
# CUDA kernel's shared memory, so both ranks are at most 32 (kConvMixMaxRank, csrc/flora_cuda.h).
FUSED_CONV_MAX_RANK = 32


def fused_conv_reason(x: Tensor, k: Tensor, spec: ConvSpec) -> str | None:
    """Why the fused core-conv ops (``ConvFused``) cannot run this conv, or None if they can.

    x (N, C_in, *sp), k (g r_out, r_in, *kernel): a batched 1-D or 2-D conv, one group, zero
    padding (asymmetric allowed), r_in and r_out <= FUSED_CONV_MAX_RANK.
    """
    if spec.dims not in (1, 2) or x.dim() != spec.dims + 2:
        return f"expected a batched 1-D or 2-D conv, got x of shape {tuple(x.shape)}"
    if spec.groups != 1:
        return f"expected groups=1, got {spec.groups}"
    if spec.padding_mode != "zeros":
        return f"expected padding_mode='zeros', got {spec.padding_mode!r}"
    if max(k.shape[0], k.shape[1]) > FUSED_CONV_MAX_RANK:
        return f"expected r_out, r_in <= {FUSED_CONV_MAX_RANK}, got {tuple(k.shape[:2])}"
    return None


def new_seed(p: float) -> int:
    """A dropout seed from torch's CPU generator (so torch.manual_seed reproduces masks)."""
    if p <= 0:
        return 0
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


class ExtBackend(Backend):
    """The compiled extension's kernels on ``device_type`` tensors; subclasses give ``_project``
    (device-specific) and may override ``_conv``, ``_compute_reason`` and ``_reconstruct_reason``."""

    device_type = "cpu"

    def __init__(self) -> None:
        self._reason: list[str | None] = []  # computed once; a plain attribute torch.compile can read

    def unavailable_reason(self) -> str | None:
        if not self._reason:
            self._reason.append(self._compute_reason())
        return self._reason[0]

    def _compute_reason(self) -> str | None:
        return load_extension()

    def _device_reason(self, tensors: Sequence[TensorSpec]) -> str | None:
        for t in tensors:
            if t.device_type != self.device_type:
                return f"expected {self.device_type} tensors, got one on {t.device}"
            if t.dtype not in FLOATS:
                return f"expected float32/float64/float16/bfloat16 tensors, got {t.dtype}"
            if t.numel == 0:
                return f"empty tensor of shape {tuple(t.shape)}"
        return None

    def unsupported_reason(self, call: Call) -> str | None:
        reason = self._device_reason(call.tensors)
        if reason is not None:
            return reason
        if call.op == "reconstruct":
            if any(f.dtype != call.core.dtype for f in call.factors):
                return f"expected the factors in the dtype of the core ({call.core.dtype})"
            return self._reconstruct_reason(call.core, call.factors)
        if call.op == "project":
            if any(f.dtype != call.x.dtype for f in call.factors):
                return f"expected the factors in the dtype of t ({call.x.dtype})"
            return None
        if call.weight.dtype != call.x.dtype:
            return f"expected the weight in the dtype of x ({call.x.dtype}), got {call.weight.dtype}"
        return None

    def _reconstruct_reason(self, core: TensorSpec, factors: Sequence[TensorSpec]) -> str | None:
        return None

    # -- ops --
    # Under autocast the ops would see mixed dtypes: cast the layer's inputs to the autocast dtype
    # (what autocast does to the base op) and run with autocast off; adapter parameters keep their
    # dtype and receive grads in it.
    def reconstruct(self, core: Tensor, factors: Sequence[Tensor], scale: float, base: Tensor | None) -> Tensor:
        if autocast_dtype(core.device.type) is not None:
            with torch.autocast(core.device.type, enabled=False):
                return self.reconstruct(core, factors, scale, base)
        shape = tuple(f.shape[0] for f in factors)
        k = core_kernel(core, factors).reshape(core.shape[0], core.shape[1], -1)
        b3 = base.reshape(shape[0], shape[1], -1) if base is not None else None
        return Reconstruct.apply(k, factors[0], factors[1], float(scale), b3).reshape(shape)

    def project(self, t: Tensor, factors: Sequence[Tensor]) -> Tensor:
        if autocast_dtype(t.device.type) is not None:
            with torch.autocast(t.device.type, enabled=False):
                return self.project(t, factors)
        return self._project(t, factors)

    def _project(self, t: Tensor, factors: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    def linear(self, x, weight, bias, core, factors, scale, dropout_p):  # type: ignore[override]
        ac = autocast_dtype(x.device.type)
        if ac is not None:
            with torch.autocast(x.device.type, enabled=False):
                return self.linear(x.to(ac), weight.to(ac), None if bias is None else bias.to(ac), core, factors,
                                   scale, dropout_p)
        dt = x.dtype
        return flora().linear_factorized(x, weight, bias, in_dtype(core, dt), in_dtype(factors[0], dt),
                                         in_dtype(factors[1], dt), float(scale), float(dropout_p), new_seed(dropout_p))

    def conv(self, x, weight, bias, core, factors, scale, spec: ConvSpec, dropout_p):  # type: ignore[override]
        ac = autocast_dtype(x.device.type)
        if ac is not None:
            with torch.autocast(x.device.type, enabled=False):
                return self.conv(x.to(ac), weight.to(ac), None if bias is None else bias.to(ac), core, factors, scale,
                                 spec, dropout_p)
        dt = x.dtype
        return self._conv(x, weight, bias, in_dtype(core, dt), [in_dtype(f, dt) for f in factors], float(scale), spec,
                          float(dropout_p))

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, fs: Sequence[Tensor], scale: float,
              spec: ConvSpec, p: float) -> Tensor:
        """y = conv(x, W) + b + scale * expand(conv(shrink(x), k)) in x's layout, k = ``conv_core``;
        core and factors in x's dtype.

        No copies of x, y or their gradients: the base conv's output (cuDNN on CUDA) takes the
        adapter in place, and its input gradient the adapter's; the kernels read and write
        contiguous and channels_last tensors through their strides. Eligible convs
        (``fused_conv_reason``) run the core conv and the expansion as one op (``ConvFused``), the
        others torch's core conv between ``BaseConvShrink`` and ``Expand``.
        """
        k = conv_core(core, fs, spec.groups)
        if fused_conv_reason(x, k, spec) is None:
            return ConvFused.apply(x, weight, bias, k, fs[0], fs[1], spec, scale, p, new_seed(p))
        y, z = BaseConvShrink.apply(x, weight, bias, fs[1], spec, p, new_seed(p))
        u = conv_nd(z, k, None, spec)
        return Expand.apply(y, u, fs[0], spec.groups, scale)

"""``CppBackend``: the extension's CPU kernels (at::parallel_for around BLAS GEMMs), on CPU tensors.

Its factorized conv takes one of two forms (``folded_form``): where the call is small (the
host-bound regime, where op count is the cost: a small input fold, and little extra arithmetic on
the activations) the folded form of the reference (``reference.conv_folded``) as one op each way
(``flora::conv_folded``, one C++ autograd node: the input fold, and without dropout the base conv and
the adapter's as one conv); otherwise the extension's projection form (``ExtBackend._conv``), which
does fewer multiply-adds per pixel when C_in >> rank. Dropout uses the extension's seeded mask either
way. A layer binds the folded form once per input signature (``conv_op``). Its merged conv without
dropout is one op too where the fold is small (``flora::conv_merged``: the fold, W + s U_out A, the
conv; depthwise 2-D convs take the extension's weight gradient)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor

from ...convspec import ConvSpec, conv_input
from ...reference import in_dtype
from ...tucker import mode_n_product
from ..base import autocast_dtype
from .backend import ExtBackend, new_seed
from .build import BUILD_HINT
from .ops import Project, flora

# Largest input fold (forward multiply-adds) the loops of ``flora::input_fold`` take: about 10-20 us
# of arithmetic at most, where the fold as GEMMs costs more in ops alone (docs/kernels/cuda.md, "CPU
# kernels: the input fold of small convs").
SMALL_FOLD = 1 << 16


# Most extra multiply-adds the folded form may spend on the activations over the projection form
# (about 0.1 ms on this CPU class): beyond it the arithmetic, not the host path, decides.
SMALL_EXTRA = 1 << 20


def small_fold(weight: Tensor, core: Tensor) -> bool:
    """Whether the input fold of core (r_out, r_in, *rk) for weight (C_out, C_in/g, *k) takes at most
    ``SMALL_FOLD`` forward multiply-adds (the kernel modes, r_out r_in taps prod(rk), then U_in's,
    r_out C_in/g r_in taps): the loops of ``flora::input_fold`` serve it."""
    c_in, taps, r_out, r_in = weight.shape[1], math.prod(weight.shape[2:]), core.shape[0], core.shape[1]
    return taps * (core.numel() + r_out * r_in * c_in) <= SMALL_FOLD


def folded_form(x: Tensor, weight: Tensor, core: Tensor, groups: int) -> bool:
    """Whether the conv of x (N, C_in, *sp) by weight (C_out, C_in/g, *k) runs in the folded form: a
    ``small_fold``, and at most ``SMALL_EXTRA`` more multiply-adds on the activations than the
    projection form (per input pixel and group: C_in/g taps r_out for conv(x, A), against C_in/g r_in
    + r_in taps r_out for the shrink and the core conv; input pixels bound the output ones)."""
    if not small_fold(weight, core):
        return False
    c_in, taps, r_out, r_in = weight.shape[1], math.prod(weight.shape[2:]), core.shape[0], core.shape[1]
    extra = c_in * taps * r_out - c_in * r_in - r_in * taps * r_out
    return (x.numel() // x.shape[1]) * groups * extra <= SMALL_EXTRA


class CppBackend(ExtBackend):
    """The extension's CPU kernels, on CPU tensors."""

    name = "cpp"
    how_to_get = BUILD_HINT
    device_type = "cpu"

    @staticmethod
    def project2(t: Tensor, u0: Tensor, u1: Tensor) -> Tensor:
        """u0^T t_k u1 per tap as a reconstruct with t as the core and the transposed factors:
        two GEMMs, no wasted du0 / du1 work."""
        return flora().tucker_reconstruct(t, u0.t(), u1.t(), 1.0, None)

    def _project(self, t: Tensor, factors: Sequence[Tensor]) -> Tensor:
        # Modes 0 and 1 first (the op reads the big tensor once, as GEMMs), then the spatial
        # modes on the small (r0, r1, *spatial) result.
        spatial = tuple(t.shape[2:])
        t3 = t.reshape(t.shape[0], t.shape[1], -1)
        p = Project.apply(t3, factors[0], factors[1], self.project2)
        p = p.reshape(factors[0].shape[1], factors[1].shape[1], *spatial)
        for n in range(p.dim() - 1, 1, -1):
            p = mode_n_product(p, factors[n].t(), n)
        return p

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, fs: Sequence[Tensor], scale: float,
              spec: ConvSpec, p: float) -> Tensor:
        if not folded_form(x, weight, core, spec.groups):
            return super()._conv(x, weight, bias, core, fs, scale, spec, p)
        return self._folded_op(x, weight, core, fs, scale, spec, p)(x, weight, bias, core, fs)

    def conv_op(self, x, weight, core, factors, scale, spec, dropout_p):  # type: ignore[override]
        if autocast_dtype(x.device.type) is not None or not folded_form(x, weight, core, spec.groups):
            return super().conv_op(x, weight, core, factors, scale, spec, dropout_p)
        dt = x.dtype
        run = self._folded_op(x, weight, core, factors, float(scale), spec, float(dropout_p))
        if all(t.dtype == dt for t in (core, *factors)):
            return run
        return lambda x, w, b, c, fs: run(x, w, b, in_dtype(c, dt), [in_dtype(f, dt) for f in fs])

    def _folded_op(self, x: Tensor, weight: Tensor, core: Tensor, fs: Sequence[Tensor], scale: float, spec: ConvSpec,
                   p: float) -> Callable[[Tensor, Tensor, Tensor | None, Tensor, Sequence[Tensor]], Tensor]:
        """The folded form (``flora::conv_folded``) for inputs of x's signature, core and factors in
        x's dtype: ``op(x, weight, bias, core, factors)``."""
        sym = spec.symmetric_zero_padding
        stride, padding, dilation, groups = geometry(spec)
        conv_folded = flora().conv_folded.default

        def op(x: Tensor, w: Tensor, b: Tensor | None, c: Tensor, fs: Sequence[Tensor]) -> Tensor:
            xa = x * flora().dropout_mask(x, p, new_seed(p)) if p > 0 else None  # the extension's seeded mask
            if sym is None:
                x = conv_input(x, spec)[0]
                xa = None if xa is None else conv_input(xa, spec)[0]
            return conv_folded(x, xa, w, b, c, fs[0], fs[1], fs[2:], scale, stride, padding, dilation, groups)

        return op

    def merged_conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
                    scale: float, spec: ConvSpec) -> Tensor:
        """``flora::conv_merged`` (one op each way) for a ``small_fold`` in x's dtype; under autocast
        or otherwise the default composition."""
        if autocast_dtype("cpu") is not None or x.dtype != weight.dtype or not small_fold(weight, core):
            return super().merged_conv(x, weight, bias, core, factors, scale, spec)
        dt = x.dtype
        if spec.symmetric_zero_padding is None:
            x = conv_input(x, spec)[0]
        fs = [in_dtype(f, dt) for f in factors]
        return flora().conv_merged(x, weight, bias, in_dtype(core, dt), fs[0], fs[1], fs[2:], float(scale),
                                   *geometry(spec))


def geometry(spec: ConvSpec) -> tuple[list[int], list[int], list[int], int]:
    """(stride, padding, dilation, groups) of the folded ops for ``spec``: the symmetric zero padding,
    or none where ``conv_input`` pads x explicitly."""
    sym = spec.symmetric_zero_padding
    return list(spec.stride), list(sym) if sym is not None else [0] * spec.dims, list(spec.dilation), spec.groups

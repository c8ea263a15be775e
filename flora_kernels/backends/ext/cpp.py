"""``CppBackend``: the extension's CPU kernels (at::parallel_for around BLAS GEMMs), on CPU tensors."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ...convspec import ConvSpec
from ...tucker import mode_n_product
from . import depthwise
from .backend import ExtBackend
from .build import BUILD_HINT
from .ops import Project, flora


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

    def merged_conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, spec: ConvSpec) -> Tensor:
        """Depthwise 2-D convs with the extension's weight gradient (``depthwise``), others torch's."""
        return depthwise.conv(x, weight, bias, spec)

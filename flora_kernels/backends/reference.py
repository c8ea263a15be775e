"""The reference backend: the pure-PyTorch paths of ``flora_kernels.reference``; runs anywhere."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .. import reference as ref
from ..convspec import ConvSpec
from ..tucker import tucker_project, tucker_reconstruct
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    how_to_get = "always available"

    def reconstruct(self, core: Tensor, factors: Sequence[Tensor], scale: float, base: Tensor | None) -> Tensor:
        return tucker_reconstruct(core, factors, scale, base)

    def project(self, t: Tensor, factors: Sequence[Tensor]) -> Tensor:
        return tucker_project(t, factors)

    def linear(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
        scale: float, dropout_p: float,
    ) -> Tensor:
        return ref.linear_factorized(x, weight, bias, core, factors, scale, dropout_p)

    def conv(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
        scale: float, spec: ConvSpec, dropout_p: float,
    ) -> Tensor:
        return ref.conv_factorized(x, weight, bias, core, factors, scale, spec, dropout_p)

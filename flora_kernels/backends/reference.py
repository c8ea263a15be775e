"""The reference backend: the pure-PyTorch paths of ``flora_kernels.reference``; runs anywhere.

Its base op is torch's own (``F.linear`` / ``conv_nd`` on the weight object), so it also serves a
base weight that is a floating tensor subclass (e.g. a torchao quantized weight), which the
fused backends cannot read."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .. import reference as ref
from ..convspec import ConvSpec
from ..tucker import tucker_project, tucker_reconstruct
from .base import STRATEGY_OPS, Backend, Call


class ReferenceBackend(Backend):
    name = "reference"
    how_to_get = "always available"
    reads_weight_memory = False

    def unsupported_reason(self, call: Call) -> str | None:
        w = call.weight
        if call.op in STRATEGY_OPS and w is None:
            return "no base weight given (base computed elsewhere): add the adapter term to it instead"
        if call.op in STRATEGY_OPS and not w.dtype.is_floating_point:
            return f"the base weight is packed {w.dtype} data that torch's {call.op} cannot use"
        return None

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

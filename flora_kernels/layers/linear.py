"""FLoRALinear: every ``nn.Linear`` subclass, and transformers' ``Conv1D`` (GPT-2).

Mode order (out, in) for both. ``Conv1D`` stores its weight as (in, out) and computes
``x W + b``; the adapter keeps the Linear convention, so its mode-order weight is the stored
weight transposed (a view) and every Linear kernel serves it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import decide_linear, decide_traced_call, linear, plan_linear_call, run_linear
from ..plan import Plan
from ..reference import linear_delta
from .base import FLoRALayer, traced_backend, traced_key, x_spec


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (without importing transformers)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(utils, "Conv1D", None)
    return cls is not None and isinstance(module, cls)


class FLoRALinear(FLoRALayer):
    """FLoRA adapter around a Linear: x (..., in) -> (..., out).

    Adapter tensors: core (r_out, r_in); factors (out, r_out), (in, r_in). ``kernel_rank`` is
    ignored.
    """

    base_types = (nn.Linear,)

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or is_hf_conv1d(module)

    @classmethod
    def weight_shape_of(cls, module: nn.Module) -> tuple[int, ...]:
        shape = tuple(module.weight.shape)
        return shape[::-1] if is_hf_conv1d(module) else shape

    @property
    def in_features(self) -> int:
        """The input size (a ``Conv1D`` stores it as ``weight.shape[0]``)."""
        base = self.base_layer
        return base.weight.shape[0] if is_hf_conv1d(base) else base.in_features

    @property
    def out_features(self) -> int:
        """The output size (a ``Conv1D``'s ``nf``)."""
        base = self.base_layer
        return base.weight.shape[1] if is_hf_conv1d(base) else base.out_features

    def weight_modes(self, w: Tensor | None = None) -> Tensor:
        w = self.base_weight() if w is None else w
        return w.t() if is_hf_conv1d(self.base_layer) else w

    def _modes_to_stored(self, delta: Tensor) -> Tensor:
        return delta.t() if is_hf_conv1d(self.base_layer) else delta

    def _forward_fused(self, x: Tensor, name: str, dropout_p: float, *args, **kwargs) -> Tensor:
        core, factors, scale = self.adapter_terms(name)
        s = self.flora_settings[name]
        if s.lean_memory:  # a separate adapter term: autograd keeps x U_in, not x (U_in is frozen)
            return self._base_forward(x) + linear_delta(x, core, factors, scale, dropout_p)
        return linear(x, self.weight_modes(), self.base_layer.bias, core, factors, scale, dropout_p, s.strategy,
                      s.backend)

    binds = True

    def _fused_op(self, x: Tensor, name: str, dropout_p: float) -> Callable[[Tensor], Tensor]:
        s = self.flora_settings[name]
        if s.lean_memory:
            return super()._fused_op(x, name, dropout_p)
        core, factors = self.tensors(name)
        factors = tuple(factors)
        held = self.scale_tensor(name)
        scale, bias = (s.scale if held is None else 1.0), self.base_layer.bias
        fresh, weight = self._weight_reader(name)
        b, strategy = decide_linear(x, weight(), bias, core, factors, scale, dropout_p, s.strategy, s.backend)
        self._bound.decisions[(*traced_key(x), torch.is_grad_enabled(), self.training)] = ((b.name, b.variant), strategy)

        def op(x: Tensor) -> Tensor:
            if not fresh():
                return self._rebind(x)
            c = core if held is None else core * held
            return run_linear(b, strategy, x, weight(), bias, c, factors, scale, dropout_p)

        return op

    def _traced_fused(self, x: Tensor, plan: tuple) -> Tensor:
        name, p, scale, access, b, strategy = plan[:6]
        core, factors, scale = self._traced_terms(name, scale)
        if self.flora_settings[name].lean_memory:
            return self._base_forward(x) + linear_delta(x, core, factors, scale, p)
        return run_linear(traced_backend(b), strategy, x, self._traced_weight(access), self.base_layer.bias, core,
                          factors, scale, p)

    def _decide_traced(self, key: tuple, name: str, dropout_p: float) -> tuple[tuple[str, str | None], str | None]:
        core, factors = self.tensors(name)
        s = self.flora_settings[name]
        b, strategy = decide_traced_call("linear", x_spec(key), key[-2], self.weight_modes(), self.base_layer.bias,
                                         core, factors, None, dropout_p, s.strategy, s.backend)
        return (b.name, b.variant), strategy

    def _delta_forward(self, x: Tensor, delta: Tensor, *args, **kwargs) -> Tensor:
        return F.linear(x, delta)

    def plan(self, x: Tensor, name: str | None = None) -> Plan:
        """The cost model's choice for input ``x`` (what ``strategy="auto"`` would run)."""
        name = name or self._sole()
        core, factors = self.tensors(name)
        return plan_linear_call(x, self.weight_modes(), core, factors, self._dropout_p(name))

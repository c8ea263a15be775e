"""Drop-in adapter layers: FLoRALinear and FLoRAConv1d/2d/3d.

Each wraps an existing module (its weight and bias stay shared and frozen, never copied) and
adds a Tucker adapter: ``core`` (ranks) and ``factors[n]`` (weight.shape[n], ranks[n]).
The forward is ``base(x) + op(dropout(x), dW)`` computed by ``flora_kernels.functional``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .config import Rank, check_rank
from .convspec import ConvSpec
from .functional import (
    STRATEGY_CHOICES,
    flora_conv,
    flora_linear,
    plan_conv_call,
    plan_linear_call,
    tucker_reconstruct,
)
from .backends.base import resolve_backend_name
from .plan import Plan
from .tucker import clamp_ranks, init_tucker_


def _adapter_dtype(weight: Tensor) -> torch.dtype:
    """Adapter parameters live in fp32 unless the base is fp64 (low-precision bases included)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _expand_rank(value: Rank, n: int, name: str) -> tuple[int, ...]:
    check_rank(value, name)
    if isinstance(value, int):
        return (value,) * n
    if len(value) != n:
        raise ValueError(f"{name}: expected an int or {n} ints, got {value!r}")
    return tuple(value)


class FLoRALayer(nn.Module):
    """Common machinery: parameters, init, merge/unmerge, enable/disable, plan, repr."""

    base_types: tuple[type[nn.Module], ...] = ()

    def __init__(
        self,
        base: nn.Module,
        rank: Rank = 16,
        kernel_rank: Rank | None = None,
        scale: float = 1.0,
        dropout: float = 0.0,
        strategy: str = "auto",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if type(base) not in self.base_types:
            raise TypeError(
                f"{type(self).__name__}: expected a {' or '.join(t.__name__ for t in self.base_types)} "
                f"module, got {type(base).__name__}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        if strategy not in STRATEGY_CHOICES:
            raise ValueError(f"strategy: expected one of {STRATEGY_CHOICES}, got {strategy!r}")
        resolve_backend_name(backend)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        spatial = w.dim() - 2
        requested = _expand_rank(rank, 2, "rank")
        if spatial and kernel_rank is not None:
            requested += _expand_rank(kernel_rank, spatial, "kernel_rank")
        else:  # full kernel rank; a Linear has no spatial mode and ignores kernel_rank
            requested += tuple(w.shape[2:])
        self.ranks = clamp_ranks(w.shape, requested)
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.strategy = strategy
        self.backend = backend
        self.merged = False
        self.adapter_enabled = True
        dt = _adapter_dtype(w)
        self.core = nn.Parameter(torch.empty(self.ranks, dtype=dt, device=w.device))
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(i, r, dtype=dt, device=w.device)) for i, r in zip(w.shape, self.ranks)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's init: core = 0, factors ~ N(0, 1 / (2 r_n)), so dW = 0."""
        init_tucker_(self.core, list(self.factors))

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def delta_weight(self) -> Tensor:
        """s * dW: (weight.shape), in the adapter's dtype."""
        return tucker_reconstruct(self.core, list(self.factors), self.scale, backend=self.backend)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s * dW into the base weight (computed in fp32 or better, then cast)."""
        if self.merged:
            return
        w = self.base.weight
        d = self.delta_weight()
        w.copy_((w.to(d.dtype) + d).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract s * dW again; restores the base weight within rounding."""
        if not self.merged:
            return
        w = self.base.weight
        d = self.delta_weight()
        w.copy_((w.to(d.dtype) - d).to(w.dtype))
        self.merged = False

    def _adapter_active(self) -> bool:
        return self.adapter_enabled and not self.merged

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    def plan(self, x: Tensor) -> Plan:
        """The cost model's choice for input ``x`` (what ``strategy="auto"`` would run)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        state = "merged" if self.merged else ("disabled" if not self.adapter_enabled else "active")
        return (
            f"ranks={self.ranks}, scale={self.scale:g}, dropout={self.dropout:g}, "
            f"strategy={self.strategy}, backend={self.backend}, {state}"
        )


class FLoRALinear(FLoRALayer):
    """FLoRA adapter around an ``nn.Linear``: x (..., in) -> (..., out).

    ``core``: (r_out, r_in); ``factors``: (out, r_out), (in, r_in). ``kernel_rank`` is ignored.
    """

    base_types = (nn.Linear,)

    def forward(self, x: Tensor) -> Tensor:
        if not self._adapter_active():
            return self.base(x)
        return flora_linear(
            x, self.base.weight, self.base.bias, self.core, list(self.factors), self.scale,
            dropout_p=self._dropout_p(), strategy=self.strategy, backend=self.backend,
        )

    def plan(self, x: Tensor) -> Plan:
        return plan_linear_call(x, self.base.weight, self.core, list(self.factors), self._dropout_p())


class _FLoRAConvNd(FLoRALayer):
    """FLoRA adapter around an ``nn.ConvNd``: x (N, C_in, *spatial) -> (N, C_out, *out_spatial).

    ``core``: (r_out, r_in, *kernel_ranks); ``factors``: (C_out, r_out), (C_in/groups, r_in),
    (k_j, rk_j). Every group shares the factors and the core.
    """

    def __init__(self, base: nn.Module, *args, **kwargs) -> None:
        super().__init__(base, *args, **kwargs)
        self.spec = ConvSpec.of(base)

    def forward(self, x: Tensor) -> Tensor:
        if not self._adapter_active():
            return self.base(x)
        s = self.spec
        return flora_conv(
            x, self.base.weight, self.base.bias, self.core, list(self.factors), self.scale,
            stride=s.stride, padding=self.base.padding, dilation=s.dilation, groups=s.groups,
            padding_mode=s.padding_mode, strategy=self.strategy, backend=self.backend,
            dropout_p=self._dropout_p(),
        )

    def plan(self, x: Tensor) -> Plan:
        if x.dim() == self.base.weight.dim() - 1:
            x = x.unsqueeze(0)
        return plan_conv_call(x, self.base.weight, self.core, list(self.factors), self.spec, self._dropout_p())


class FLoRAConv1d(_FLoRAConvNd):
    base_types = (nn.Conv1d,)


class FLoRAConv2d(_FLoRAConvNd):
    base_types = (nn.Conv2d,)


class FLoRAConv3d(_FLoRAConvNd):
    base_types = (nn.Conv3d,)


LAYER_FOR: dict[type[nn.Module], type[FLoRALayer]] = {
    nn.Linear: FLoRALinear,
    nn.Conv1d: FLoRAConv1d,
    nn.Conv2d: FLoRAConv2d,
    nn.Conv3d: FLoRAConv3d,
}


def wrap(module: nn.Module, **kwargs) -> FLoRALayer:
    """The FLoRA layer for ``module``'s type; raises naming the supported types otherwise."""
    cls = LAYER_FOR.get(type(module))
    if cls is None:
        raise TypeError(
            f"unsupported module type {type(module).__name__}: expected one of "
            f"{', '.join(t.__name__ for t in LAYER_FOR)}"
        )
    return cls(module, **kwargs)


def flora_layers(model: nn.Module) -> Sequence[tuple[str, FLoRALayer]]:
    """(name, layer) for every FLoRA layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FLoRALayer)]

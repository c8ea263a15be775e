"""Convolutions: FLoRAConv1d/2d/3d and FLoRAConvTranspose1d/2d/3d (subclasses included).

Mode order is the weight's as torch stores it: ConvNd (out, in/groups, k_1..k_d);
ConvTransposeNd (in, out/groups, k_1..k_d). Every group shares the factors and the core.
``ConvNd`` has the factorized path (projection, core conv, expansion) and the merged one;
``ConvTransposeNd`` runs the merged path (conv_transpose with W + s dW) on the reference backend.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .. import reference
from ..convspec import ConvSpec, conv_nd
from ..functional import flora_conv, plan_conv_call
from ..plan import Plan
from .base import FLoRALayer


class _FLoRAConvNd(FLoRALayer):
    """FLoRA adapter around a ConvNd: x (N, C_in, *spatial) -> (N, C_out, *out_spatial).

    Adapter tensors: core (r_out, r_in, *kernel_ranks); factors (C_out, r_out),
    (C_in/groups, r_in), (k_j, rk_j).
    """

    def __init__(self, base_layer: nn.Module, *args, **kwargs) -> None:
        super().__init__(base_layer, *args, **kwargs)
        self.spec = ConvSpec.of(base_layer)

    def _forward_fused(self, x: Tensor, name: str, dropout_p: float, *args, **kwargs) -> Tensor:
        core, factors, scale = self.adapter_terms(name)
        s, spec = self.flora_settings[name], self.spec
        return flora_conv(
            x, self.base_weight(), self.base_layer.bias, core, factors, scale,
            stride=spec.stride, padding=self.base_layer.padding, dilation=spec.dilation, groups=spec.groups,
            padding_mode=spec.padding_mode, strategy=s.strategy, backend=s.backend, dropout_p=dropout_p,
        )

    def _delta_forward(self, x: Tensor, delta: Tensor, *args, **kwargs) -> Tensor:
        return conv_nd(x, delta, None, self.spec)

    @property
    def in_features(self) -> int:
        """PEFT's name for ``in_channels``."""
        return self.base_layer.in_channels

    @property
    def out_features(self) -> int:
        """PEFT's name for ``out_channels``."""
        return self.base_layer.out_channels

    def plan(self, x: Tensor, name: str | None = None) -> Plan:
        """The cost model's choice for input ``x`` (what ``strategy="auto"`` would run)."""
        name = name or self._sole()
        if x.dim() == self.base_weight().dim() - 1:
            x = x.unsqueeze(0)
        core, factors = self.tensors(name)
        return plan_conv_call(x, self.base_weight(), core, factors, self.spec, self._dropout_p(name))


class FLoRAConv1d(_FLoRAConvNd):
    base_types = (nn.Conv1d,)


class FLoRAConv2d(_FLoRAConvNd):
    base_types = (nn.Conv2d,)


class FLoRAConv3d(_FLoRAConvNd):
    base_types = (nn.Conv3d,)


class _FLoRAConvTransposeNd(FLoRALayer):
    """FLoRA adapter around a ConvTransposeNd (stride, padding, output_padding, dilation, groups
    and ``output_size`` as the base layer handles them).

    Adapter tensors: core (r_in, r_out, *kernel_ranks); factors (C_in, r_in),
    (C_out/groups, r_out), (k_j, rk_j). ``strategy="auto"``: factorized when gradients are
    needed (no weight-gradient op), merged otherwise and for depthwise layers.
    """

    input_mode = 0  # the weight is (in, out/groups, k...)
    backends = ("reference",)

    @property
    def in_features(self) -> int:
        """PEFT's name for ``in_channels``."""
        return self.base_layer.in_channels

    @property
    def out_features(self) -> int:
        """PEFT's name for ``out_channels``."""
        return self.base_layer.out_channels

    def _strategy(self, x: Tensor, name: str) -> str:
        s = self.flora_settings[name].strategy
        if s != "auto":
            return s
        base = self.base_layer
        depthwise = base.groups > 1 and base.groups == base.in_channels
        grad = torch.is_grad_enabled() and (x.requires_grad or self.flora_core[name].requires_grad)
        return "factorized" if grad and not depthwise else "merged"

    def _forward_fused(self, x: Tensor, name: str, dropout_p: float, *args, **kwargs) -> Tensor:
        base = self.base_layer
        if self._strategy(x, name) == "merged":
            if dropout_p > 0:
                return self._base_forward(x, *args, **kwargs) + self._delta_term(x, name, *args, **kwargs)
            w = self.base_weight()
            weight = w + self._modes_to_stored(self.delta_weight(name)).to(w.dtype)
            return functional_call(base, {self.weight_name: weight}, (x, *args), kwargs)
        output_size = args[0] if args else kwargs.get("output_size")
        d = base.weight.dim() - 2
        unbatched = x.dim() == d + 1
        xb = x.unsqueeze(0) if unbatched else x
        out_pad = base._output_padding(xb, output_size, base.stride, base.padding, base.kernel_size, d, base.dilation)
        core, factors, scale = self.adapter_terms(name)
        y = reference.conv_transpose_factorized(
            xb, self.base_weight(), base.bias, core, factors, scale, base.stride,
            base.padding, tuple(out_pad), base.groups, base.dilation, dropout_p,
        )
        return y.squeeze(0) if unbatched else y

    def _delta_forward(self, x: Tensor, delta: Tensor, *args, **kwargs) -> Tensor:
        params = {self.weight_name: delta}
        if self.base_layer.bias is not None:
            params["bias"] = torch.zeros_like(self.base_layer.bias)
        return functional_call(self.base_layer, params, (x, *args), kwargs)


class FLoRAConvTranspose1d(_FLoRAConvTransposeNd):
    base_types = (nn.ConvTranspose1d,)


class FLoRAConvTranspose2d(_FLoRAConvTransposeNd):
    base_types = (nn.ConvTranspose2d,)


class FLoRAConvTranspose3d(_FLoRAConvTransposeNd):
    base_types = (nn.ConvTranspose3d,)

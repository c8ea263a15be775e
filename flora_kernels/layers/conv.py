"""Convolutions: FLoRAConv1d/2d/3d and FLoRAConvTranspose1d/2d/3d (subclasses included).

Mode order is the weight's as torch stores it: ConvNd (out, in/groups, k_1..k_d);
ConvTransposeNd (in, out/groups, k_1..k_d). Every group shares the factors and the core.
``ConvNd`` has the factorized path (projection, core conv, expansion) and the merged one;
``ConvTransposeNd`` runs the merged path (conv_transpose with W + s dW) on the reference backend.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .. import reference
from ..convspec import ConvSpec, conv_nd
from ..functional import bind_conv, conv, decide_conv, decide_traced_call, plan_conv_call, run_conv
from ..plan import Plan
from .base import FLoRALayer, traced_backend, traced_key, x_spec


class _ChannelFeatures:
    """PEFT's ``in_features`` / ``out_features`` for a conv base layer: its in/out channels."""

    base_layer: nn.Module

    @property
    def in_features(self) -> int:
        return self.base_layer.in_channels

    @property
    def out_features(self) -> int:
        return self.base_layer.out_channels


class _FLoRAConvNd(_ChannelFeatures, FLoRALayer):
    """FLoRA adapter around a ConvNd: x (N, C_in, *spatial) -> (N, C_out, *out_spatial).

    Adapter tensors: core (r_out, r_in, *kernel_ranks); factors (C_out, r_out),
    (C_in/groups, r_in), (k_j, rk_j).
    """

    def __init__(self, base_layer: nn.Module, *args, **kwargs) -> None:
        super().__init__(base_layer, *args, **kwargs)
        self.spec = ConvSpec.of(base_layer)

    binds = True

    def _fused_op(self, x: Tensor, name: str, dropout_p: float) -> Callable[[Tensor], Tensor]:
        core, factors = self.tensors(name)
        factors = tuple(factors)
        s, spec = self.flora_settings[name], self.spec
        held = self.scale_tensor(name)
        scale, bias = (s.scale if held is None else 1.0), self.base_layer.bias
        fresh, weight = self._weight_reader(name)
        unbatched = x.dim() == len(factors) - 1
        xb = x.unsqueeze(0) if unbatched else x
        b, strategy = decide_conv(xb, weight(), bias, core, factors, scale, spec, dropout_p, s.strategy, s.backend)
        self._bound.decisions[(*traced_key(x), torch.is_grad_enabled(), self.training)] = ((b.name, b.variant), strategy)
        run = bind_conv(b, strategy, xb, weight(), core, factors, scale, spec, dropout_p)

        def op(x: Tensor) -> Tensor:
            if not fresh():
                return self._rebind(x)
            c = core if held is None else core * held
            if unbatched:
                return run(x.unsqueeze(0), weight(), bias, c, factors).squeeze(0)
            return run(x, weight(), bias, c, factors)

        return op

    def _traced_fused(self, x: Tensor, plan: tuple) -> Tensor:
        name, p, scale, access, b, strategy = plan[:6]
        core, factors, scale = self._traced_terms(name, scale)
        unbatched = x.dim() == len(factors) - 1
        y = run_conv(traced_backend(b), strategy, x.unsqueeze(0) if unbatched else x, self._traced_weight(access),
                     self.base_layer.bias, core, factors, scale, self.spec, p)
        return y.squeeze(0) if unbatched else y

    def _forward_fused(self, x: Tensor, name: str, dropout_p: float, *args, **kwargs) -> Tensor:
        core, factors, scale = self.adapter_terms(name)
        s = self.flora_settings[name]
        unbatched = x.dim() == len(factors) - 1
        y = conv(x.unsqueeze(0) if unbatched else x, self.base_weight(), self.base_layer.bias, core, factors,
                 scale, self.spec, dropout_p, s.strategy, s.backend)
        return y.squeeze(0) if unbatched else y

    def _decide_traced(self, key: tuple, name: str, dropout_p: float) -> tuple[tuple[str, str | None], str | None]:
        core, factors = self.tensors(name)
        s = self.flora_settings[name]
        xs = x_spec(key)
        if len(xs.shape) == len(factors) - 1:
            xs = xs._replace(shape=(1, *xs.shape))
        b, strategy = decide_traced_call("conv", xs, key[-2], self.base_weight(), self.base_layer.bias, core, factors,
                                         self.spec, dropout_p, s.strategy, s.backend)
        return (b.name, b.variant), strategy

    def _delta_forward(self, x: Tensor, delta: Tensor, *args, **kwargs) -> Tensor:
        return conv_nd(x, delta, None, self.spec)

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


class _FLoRAConvTransposeNd(_ChannelFeatures, FLoRALayer):
    """FLoRA adapter around a ConvTransposeNd (stride, padding, output_padding, dilation, groups
    and ``output_size`` as the base layer handles them).

    Adapter tensors: core (r_in, r_out, *kernel_ranks); factors (C_in, r_in),
    (C_out/groups, r_out), (k_j, rk_j). ``strategy="auto"``: factorized when gradients are
    needed (no weight-gradient op), merged otherwise and for depthwise layers.
    """

    input_mode = 0  # the weight is (in, out/groups, k...)
    backends = ("reference",)
    binds = True  # forward(x) without output_size: settings and weight taken per call by _forward_fused

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

"""FLoRAQuantLinear: FLoRA adapters on quantized frozen Linear layers.

Supported bases (each optional: the library never imports bitsandbytes or torchao itself, it
recognises their types through ``sys.modules`` once the user has imported them):

- bitsandbytes ``Linear4bit`` (``LinearNF4``, ``LinearFP4``; nf4 / fp4, with or without double
  quantization, any compute dtype) and ``Linear8bitLt`` (int8 weights, ``has_fp16_weights=False``);
- an ``nn.Linear`` whose weight is a torchao quantized tensor (``quantize_`` with
  ``Int8WeightOnlyConfig``, ``Int8DynamicActivationInt8WeightConfig``, ``IntxWeightOnlyConfig``, ...).

Forward: ``base(x)`` is the quantized module's own forward (its kernels, its compute dtype);
each live adapter adds its factorized term ``((dropout(x) U_in) (s G^T)) U_out^T`` computed by
the reference math (``reference.linear_delta``) in the input's dtype. The packed weight is
never read on the forward or backward path and dW is never built.

Weight: mode order (out, in) from the module's ``out_features`` / ``in_features``.
``base_weight()`` is the dequantized weight (fp32, (out, in)); it is read by merge and by
``effective_weight`` only.

Merge (``FLoRALayer.merge`` through the ``_write_weight`` / ``_restore_weight`` hooks):
dequantize, add ``s dW``, requantize with the base's own settings, and warn with the rounding
error (``||dequant(requant(W + dW)) - (W + dW)|| / ||W + dW||``, ``QuantizedMergeWarning``).
The original quantized parameter (and quant state) is kept while merged, so unmerge restores it
bit for bit. A torchao tensor type without a known requantization is refused with a
``ValueError`` naming the alternatives. ``merge_and_unload`` leaves a quantized module.
"""

from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..reference import linear_delta
from ..testing import rel_err
from .linear import FLoRALinear


class QuantizedMergeWarning(UserWarning):
    """A merge into a quantized weight rounded the merged weight (the warning gives by how much)."""


class QuantScheme:
    """How one kind of quantized Linear stores its weight: recognise it, dequantize it,
    requantize a new weight into it, and snapshot / restore the exact quantized state."""

    name = "quantized"

    def accepts(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def describe(self, module: nn.Module) -> str:
        """A short description of the quantization (for repr and plan)."""
        return self.name

    def check(self, module: nn.Module) -> None:
        """Raise ``ValueError`` if ``module`` is of this kind but not in a usable state."""

    def shape(self, module: nn.Module) -> tuple[int, int]:
        return (module.out_features, module.in_features)

    def dequantize(self, module: nn.Module) -> Tensor:
        """The weight the module computes with: (out, in), fp32."""
        raise NotImplementedError

    def requantize(self, module: nn.Module, weight: Tensor) -> None:
        """Make ``module`` compute with ``weight`` (out, in) quantized by its own settings."""
        raise NotImplementedError

    def snapshot(self, module: nn.Module) -> dict[str, Any]:
        """Everything ``restore`` needs to put the current quantized state back exactly."""
        return {"weight": module._parameters["weight"]}

    def restore(self, module: nn.Module, saved: dict[str, Any]) -> None:
        module._parameters["weight"] = saved["weight"]

    def packed_tensors(self, module: nn.Module) -> dict[str, Tensor]:
        """The quantized bytes and statistics as plain tensors (for bit-for-bit comparisons)."""
        raise NotImplementedError


def _bnb_nn() -> Any:
    return sys.modules.get("bitsandbytes.nn")


class Bnb4bit(QuantScheme):
    """bitsandbytes ``Linear4bit``: packed 4-bit codes (nf4 / fp4) + a ``QuantState`` (blockwise
    absmax, optionally itself quantized: double quantization)."""

    name = "bitsandbytes 4-bit"

    def accepts(self, module: nn.Module) -> bool:
        bnb_nn = _bnb_nn()
        return bnb_nn is not None and isinstance(module, bnb_nn.Linear4bit)

    def describe(self, module: nn.Module) -> str:
        w = module.weight
        return (
            f"bitsandbytes {w.quant_type}, blocksize {w.blocksize}, double quant {bool(w.compress_statistics)}, "
            f"compute dtype {module.compute_dtype}"
        )

    def check(self, module: nn.Module) -> None:
        if getattr(module.weight, "quant_state", None) is None and getattr(module, "quant_state", None) is None:
            raise ValueError(
                f"{type(module).__name__}: expected a quantized weight, got an unquantized one (move the module to "
                "its device, e.g. module.to('cpu') or .cuda(), which quantizes it)"
            )

    def _data_and_state(self, module: nn.Module) -> tuple[Tensor, Any]:
        w = module.weight
        state = w.quant_state if w.quant_state is not None else module.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks the weight for its CPU inference kernel on an eval forward;
            # undo that on copies (the module keeps its packing)
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            return _convert_weight_packed_for_cpu_inverse(w.data.clone(), copy.deepcopy(state))
        return w.data, state

    def dequantize(self, module: nn.Module) -> Tensor:
        from bitsandbytes.functional import dequantize_4bit

        data, state = self._data_and_state(module)
        return dequantize_4bit(data, state).to(torch.float32)

    def requantize(self, module: nn.Module, weight: Tensor) -> None:
        bnb_nn = _bnb_nn()
        w = module.weight
        _, state = self._data_and_state(module)
        new = bnb_nn.Params4bit(
            weight.to(device="cpu", dtype=state.dtype), requires_grad=False, blocksize=w.blocksize,
            compress_statistics=w.compress_statistics, quant_type=w.quant_type, quant_storage=w.quant_storage,
            module=module,
        )
        module.weight = new.to(w.device)  # quantizes and sets module.quant_state

    def snapshot(self, module: nn.Module) -> dict[str, Any]:
        return {"weight": module._parameters["weight"], "quant_state": module.quant_state}

    def restore(self, module: nn.Module, saved: dict[str, Any]) -> None:
        module._parameters["weight"] = saved["weight"]
        module.quant_state = saved["quant_state"]

    def packed_tensors(self, module: nn.Module) -> dict[str, Tensor]:
        w = module.weight
        state = w.quant_state if w.quant_state is not None else module.quant_state
        out = {"weight": w.data}
        out.update({k: v for k, v in state.as_dict(packed=True).items() if isinstance(v, Tensor)})
        return out


class Bnb8bit(QuantScheme):
    """bitsandbytes ``Linear8bitLt``: int8 codes (out, in) with one absmax per row (SCB), held by
    the weight until the first forward moves them to ``module.state``."""

    name = "bitsandbytes 8-bit"

    def accepts(self, module: nn.Module) -> bool:
        bnb_nn = _bnb_nn()
        return bnb_nn is not None and isinstance(module, bnb_nn.Linear8bitLt)

    def describe(self, module: nn.Module) -> str:
        return f"bitsandbytes int8 (LLM.int8), threshold {module.state.threshold:g}"

    def check(self, module: nn.Module) -> None:
        if module.state.has_fp16_weights or module.weight.dtype != torch.int8:
            raise ValueError(
                f"{type(module).__name__}: expected int8 weights (has_fp16_weights=False, moved to its device), "
                f"got {module.weight.dtype} weights with has_fp16_weights={module.state.has_fp16_weights}"
            )

    def _scb(self, module: nn.Module) -> Tensor:
        scb = module.weight.SCB
        return scb if scb is not None else module.state.SCB

    def dequantize(self, module: nn.Module) -> Tensor:
        from bitsandbytes.functional import int8_vectorwise_dequant

        w = module.weight
        return int8_vectorwise_dequant(w.data, self._scb(module).to(w.device)).to(torch.float32)

    def requantize(self, module: nn.Module, weight: Tensor) -> None:
        bnb_nn = _bnb_nn()
        w = module.weight
        module.weight = bnb_nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False).to(w.device)
        module.state.reset_grads()  # the next forward takes CB / SCB from the new weight

    def snapshot(self, module: nn.Module) -> dict[str, Any]:
        return {"weight": module._parameters["weight"], "CB": module.state.CB, "SCB": module.state.SCB}

    def restore(self, module: nn.Module, saved: dict[str, Any]) -> None:
        module._parameters["weight"] = saved["weight"]
        module.state.reset_grads()
        module.state.CB, module.state.SCB = saved["CB"], saved["SCB"]

    def packed_tensors(self, module: nn.Module) -> dict[str, Tensor]:
        return {"weight": module.weight.data, "SCB": self._scb(module)}


class Torchao(QuantScheme):
    """An ``nn.Linear`` whose weight is a torchao quantized tensor subclass (``quantize_``)."""

    name = "torchao"

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and type(module.weight).__module__.startswith("torchao.")

    def describe(self, module: nn.Module) -> str:
        w = module.weight
        return f"torchao {type(w).__name__}, block size {tuple(getattr(w, 'block_size', ()))}"

    def dequantize(self, module: nn.Module) -> Tensor:
        return module.weight.dequantize().to(torch.float32)

    def requantize(self, module: nn.Module, weight: Tensor) -> None:
        w = module.weight
        kind = type(w).__name__
        hp = weight.to(w.dtype)
        if kind == "Int8Tensor":
            from torchao.quantization.granularity import PerGroup, PerRow, PerTensor

            block = list(w.block_size)
            if block == list(w.shape):
                granularity = PerTensor()
            elif block == [1, w.shape[-1]]:
                granularity = PerRow()
            else:
                granularity = PerGroup(block[-1])
            new = type(w).from_hp(hp, granularity, act_quant_kwargs=w.act_quant_kwargs, reduce_range=w.reduce_range)
        elif kind == "IntxUnpackedToInt8Tensor":
            from torchao.quantization.quant_primitives import MappingType

            symmetric = bool((w.zero_point == 0).all())
            new = type(w).from_hp(
                hp, tuple(w.block_size), w.target_dtype,
                mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC,
                activation_quantization=w.activation_quantization,
            )
        else:
            raise ValueError(
                f"merge: requantizing a torchao {kind} weight is not supported (supported: Int8Tensor, "
                "IntxUnpackedToInt8Tensor); use the adapter unmerged, or dequantize the base model, merge, and "
                "quantize it again with torchao's quantize_"
            )
        module.weight = nn.Parameter(new, requires_grad=False)

    def packed_tensors(self, module: nn.Module) -> dict[str, Tensor]:
        w = module.weight
        names, _ = w.__tensor_flatten__()
        return {n: getattr(w, n) for n in names if isinstance(getattr(w, n), Tensor)}


SCHEMES: tuple[QuantScheme, ...] = (Bnb4bit(), Bnb8bit(), Torchao())


def quant_scheme(module: nn.Module) -> QuantScheme | None:
    """The scheme of a quantized Linear ``module``, or None for any other module."""
    return next((s for s in SCHEMES if s.accepts(module)), None)


@dataclass(frozen=True)
class QuantPlan:
    """What a quantized layer runs: the base by the module's own forward, the adapters by the
    reference factorized math (no strategy or backend choice is made)."""

    base: str
    strategy: str = "factorized"
    backend: str = "reference"

    def __str__(self) -> str:
        return f"QuantPlan(base: {self.base} forward; adapters: {self.strategy} on {self.backend})"


class FLoRAQuantLinear(FLoRALinear):
    """FLoRA adapter around a quantized Linear: x (..., in) -> (..., out); see the module docstring.

    Adapter tensors as ``FLoRALinear``: core (r_out, r_in); factors (out, r_out), (in, r_in), fp32.
    """

    strategies = ("factorized",)
    backends = ("reference",)
    binds = False  # forward: base(x) by the quantized module + each adapter's term (_forward_adapters)

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return quant_scheme(module) is not None

    def __init__(self, base_layer: nn.Module, *args: Any, **kwargs: Any) -> None:
        scheme = quant_scheme(base_layer)
        if scheme is not None:
            scheme.check(base_layer)
        super().__init__(base_layer, *args, **kwargs)

    @property
    def scheme(self) -> QuantScheme:
        scheme = quant_scheme(self.base_layer)
        assert scheme is not None
        return scheme

    @classmethod
    def weight_shape_of(cls, module: nn.Module) -> tuple[int, ...]:
        scheme = quant_scheme(module)
        assert scheme is not None
        return scheme.shape(module)

    def base_weight(self) -> Tensor:
        """The dequantized weight (out, in), fp32 (read by merge, never by forward)."""
        return self.scheme.dequantize(self.base_layer)

    # forward ---------------------------------------------------------------------------

    def adapter_term(self, x: Tensor, name: str) -> Tensor:
        """Adapter ``name``'s output (..., out) for x (..., in), dropout included, in x's dtype."""
        core, factors, scale = self.adapter_terms(name)
        return linear_delta(x, core, factors, scale, self._dropout_p(name))

    def _forward_adapters(self, x: Tensor, live: list[str], *args: Any, **kwargs: Any) -> Tensor:
        y = self.base_layer(x)
        for a in live:
            y = y + self.adapter_term(x, a).to(y.dtype)
        return y

    def plan(self, x: Tensor | None = None, name: str | None = None) -> QuantPlan:
        """What runs (the same for every input)."""
        return QuantPlan(self.scheme.describe(self.base_layer))

    def extra_repr(self) -> str:
        return f"{self.plan()}; {super().extra_repr()}"

    # merge hooks -----------------------------------------------------------------------

    def _write_weight(self, new: Tensor, first: bool) -> None:
        """Requantize ``new`` (out, in) into the base, keeping the original quantized state."""
        scheme, base = self.scheme, self.base_layer
        if first:
            self._merge_saved = scheme.snapshot(base)
        try:
            scheme.requantize(base, new)
        except Exception:
            if first:
                scheme.restore(base, self._merge_saved)
                self._merge_saved = None
            raise
        err = rel_err(scheme.dequantize(base), new)
        warnings.warn(
            f"FLoRA merge into a {scheme.describe(base)} weight: requantizing W + dW rounded it by {err:.3g} "
            "(relative norm), so merged outputs differ from unmerged ones by about that much; unmerge restores the "
            "original quantized weight exactly",
            QuantizedMergeWarning,
            stacklevel=4,
        )
        self._changed()

    def _restore_weight(self) -> None:
        assert self._merge_saved is not None
        self.scheme.restore(self.base_layer, self._merge_saved)
        self._merge_saved = None
        self._changed()

"""Which FLoRA layer adapts which module: ``layer_class_for``, ``wrap``, ``flora_layers``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .base import FLoRALayer
from .conv import (
    FLoRAConv1d,
    FLoRAConv2d,
    FLoRAConv3d,
    FLoRAConvTranspose1d,
    FLoRAConvTranspose2d,
    FLoRAConvTranspose3d,
)
from .embedding import FLoRAEmbedding
from .linear import FLoRALinear
from .mha import FLoRAMultiheadAttention
from .quantized import FLoRAQuantLinear

# Quantized Linears first: they are nn.Linear subclasses (or nn.Linear with a quantized weight).
LAYER_CLASSES: tuple[type[FLoRALayer], ...] = (
    FLoRAQuantLinear,
    FLoRALinear,
    FLoRAConv1d,
    FLoRAConv2d,
    FLoRAConv3d,
    FLoRAConvTranspose1d,
    FLoRAConvTranspose2d,
    FLoRAConvTranspose3d,
    FLoRAEmbedding,
    FLoRAMultiheadAttention,
)
SUPPORTED = (
    "Linear (and subclasses, transformers Conv1D), Conv1d/2d/3d, ConvTranspose1d/2d/3d, Embedding, "
    "MultiheadAttention; quantized Linear: bitsandbytes Linear4bit / Linear8bitLt, torchao-quantized Linear"
)


def layer_class_for(module: nn.Module) -> type[FLoRALayer] | None:
    """The FLoRA layer class adapting ``module`` (its type or a subclass), or None."""
    if isinstance(module, FLoRALayer):
        return None
    for cls in LAYER_CLASSES:
        if cls.accepts(module):
            return cls
    return None


def wrap(module: nn.Module, **kwargs) -> FLoRALayer:
    """The FLoRA layer for ``module``; raises ``TypeError`` naming the supported types otherwise."""
    cls = layer_class_for(module)
    if cls is None:
        raise TypeError(f"unsupported module type {type(module).__name__}: expected one of {SUPPORTED}")
    return cls(module, **kwargs)


def flora_layers(model: nn.Module) -> Sequence[tuple[str, FLoRALayer]]:
    """(name, layer) for every FLoRA layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FLoRALayer)]


"""Drop-in adapter layers: a FLoRALayer wraps a frozen module and holds named Tucker adapters.

    base.py        FLoRALayer (adapters by name, forward, mixed batches, merge rules)
    linear.py      FLoRALinear (nn.Linear subclasses, transformers Conv1D)
    conv.py        FLoRAConv1d/2d/3d, FLoRAConvTranspose1d/2d/3d
    embedding.py   FLoRAEmbedding
    mha.py         FLoRAMultiheadAttention
    quantized.py   FLoRAQuantLinear (bitsandbytes 4/8-bit, torchao-quantized Linear)
    registry.py    layer_class_for / wrap / flora_layers
"""

from .base import AdapterSettings, FLoRALayer
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
from .quantized import FLoRAQuantLinear, QuantizedMergeWarning
from .registry import LAYER_CLASSES, SUPPORTED, flora_layers, layer_class_for, wrap

__all__ = [
    "LAYER_CLASSES",
    "SUPPORTED",
    "AdapterSettings",
    "FLoRAConv1d",
    "FLoRAConv2d",
    "FLoRAConv3d",
    "FLoRAConvTranspose1d",
    "FLoRAConvTranspose2d",
    "FLoRAConvTranspose3d",
    "FLoRAEmbedding",
    "FLoRALayer",
    "FLoRALinear",
    "FLoRAMultiheadAttention",
    "FLoRAQuantLinear",
    "QuantizedMergeWarning",
    "flora_layers",
    "layer_class_for",
    "wrap",
]

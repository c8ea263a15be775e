"""flora_kernels: fused kernels and drop-in layers for FLoRA (Tucker-structured PEFT adapters).

    import flora_kernels as fk
    model = fk.inject_flora(model, fk.FLoRAConfig(rank=16, target_modules=["conv1", "fc"]))

See README.md for the tour and docs/ARCHITECTURE.md for the data flow.
"""

from . import convert
from .backends import BackendUnavailable, available_backends
from .backends.autotune import (
    AutotuneWarning,
    Decision,
    autotune_enabled,
    clear_autotune_cache,
    dispatch_policy,
    dispatch_report,
    force_dispatch,
    record_dispatch,
    set_autotune,
    set_dispatch_policy,
)
from .config import FLoRAConfig
from .convert.extract import extract_flora
from .convspec import ConvSpec
from .decompose import tucker_decompose
from .functional import flora_conv, flora_linear, tucker_project, tucker_reconstruct
from .hotswap import hotswap_adapter, prepare_hotswap
from .layers import (
    FLoRAConv1d,
    FLoRAConv2d,
    FLoRAConv3d,
    FLoRAConvTranspose1d,
    FLoRAConvTranspose2d,
    FLoRAConvTranspose3d,
    FLoRAEmbedding,
    FLoRALayer,
    FLoRALinear,
    FLoRAMultiheadAttention,
    FLoRAQuantLinear,
    QuantizedMergeWarning,
)
from .model import (
    ParamSummary,
    active_adapters,
    adapter_batch,
    add_adapter,
    add_weighted_adapter,
    delete_adapter,
    disable_adapter,
    inject_flora,
    load_flora,
    merge_and_unload,
    merge_flora,
    param_summary,
    save_flora,
    set_adapter,
    set_adapter_scale,
    unmerge_flora,
)
from .plan import Plan
from .quantization import prepare_model_for_kbit_training

__version__ = "0.1.0"

__all__ = [
    "AutotuneWarning",
    "BackendUnavailable",
    "ConvSpec",
    "Decision",
    "FLoRAConfig",
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
    "ParamSummary",
    "Plan",
    "QuantizedMergeWarning",
    "active_adapters",
    "adapter_batch",
    "add_adapter",
    "add_weighted_adapter",
    "autotune_enabled",
    "available_backends",
    "clear_autotune_cache",
    "convert",
    "delete_adapter",
    "disable_adapter",
    "dispatch_policy",
    "dispatch_report",
    "extract_flora",
    "flora_conv",
    "flora_linear",
    "force_dispatch",
    "hotswap_adapter",
    "inject_flora",
    "load_flora",
    "merge_and_unload",
    "merge_flora",
    "param_summary",
    "prepare_hotswap",
    "prepare_model_for_kbit_training",
    "record_dispatch",
    "save_flora",
    "set_adapter",
    "set_adapter_scale",
    "set_autotune",
    "set_dispatch_policy",
    "tucker_decompose",
    "tucker_project",
    "tucker_reconstruct",
    "unmerge_flora",
]

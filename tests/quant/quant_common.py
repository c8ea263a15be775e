"""Quantized Linear builders for the tests in tests/quant (each skips when its package is missing)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

IN, OUT = 64, 96  # bitsandbytes: 4-bit blocks of 64; its CPU eval kernel needs in % 64 == 0 and out % 32 == 0


def _bnb():
    return pytest.importorskip("bitsandbytes")


def _torchao_quantize(config_name: str, **kwargs) -> Callable[[nn.Linear], nn.Module]:
    def build(lin: nn.Linear) -> nn.Module:
        pytest.importorskip("torchao")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as q
        lin = nn.Sequential(lin)
        q.quantize_(lin, getattr(q, config_name)(**kwargs))
        return lin[0]

    return build


def _bnb4(quant_type: str, double: bool, compute: torch.dtype) -> Callable[[nn.Linear], nn.Module]:
    def build(lin: nn.Linear) -> nn.Module:
        bnb = _bnb()
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute,
                              compress_statistics=double, quant_type=quant_type)
        q.load_state_dict(lin.state_dict())
        return q.to("cpu")  # quantizes

    return build


def _bnb8(threshold: float) -> Callable[[nn.Linear], nn.Module]:
    def build(lin: nn.Linear) -> nn.Module:
        bnb = _bnb()
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False,
                                threshold=threshold)
        q.load_state_dict(lin.state_dict())
        return q.to("cpu")

    return build


def _intx4() -> Callable[[nn.Linear], nn.Module]:
    def build(lin: nn.Linear) -> nn.Module:
        return _torchao_quantize("IntxWeightOnlyConfig", weight_dtype=torch.int4)(lin)

    return build


# name -> (builder from an nn.Linear, compute dtype of the inputs)
BASES: dict[str, tuple[Callable[[nn.Linear], nn.Module], torch.dtype]] = {
    "bnb-nf4": (_bnb4("nf4", False, torch.float32), torch.float32),
    "bnb-nf4-dq-bf16": (_bnb4("nf4", True, torch.bfloat16), torch.bfloat16),
    "bnb-fp4-dq": (_bnb4("fp4", True, torch.float32), torch.float32),
    "bnb-fp4-bf16": (_bnb4("fp4", False, torch.bfloat16), torch.bfloat16),
    "bnb-int8": (_bnb8(0.0), torch.float32),
    "bnb-int8-outliers": (_bnb8(6.0), torch.float32),  # LLM.int8 with outlier decomposition
    "torchao-int8wo": (_torchao_quantize("Int8WeightOnlyConfig"), torch.float32),
    "torchao-intx4": (_intx4(), torch.float32),
}


def make_base(name: str, bias: bool = True) -> nn.Module:
    build, _ = BASES[name]
    return build(nn.Linear(IN, OUT, bias=bias))


def randomize_adapter_(layer: nn.Module, std: float = 0.3) -> None:
    with torch.no_grad():
        for a in layer.adapter_names:
            core, factors = layer.tensors(a)
            core.normal_(0, std)
            for f in factors:
                f.normal_(0, 0.5)


def packed_equal(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    """Whether two ``QuantScheme.packed_tensors`` snapshots hold the same bytes."""
    return before.keys() == after.keys() and all(
        before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before
    )


def packed_copy(layer_or_module: nn.Module) -> dict[str, torch.Tensor]:
    from flora_kernels.layers.quantized import quant_scheme

    module = getattr(layer_or_module, "base_layer", layer_or_module)
    scheme = quant_scheme(module)
    return {k: v.detach().clone() for k, v in scheme.packed_tensors(module).items()}

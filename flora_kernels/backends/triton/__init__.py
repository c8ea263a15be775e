"""The Triton backend: fused kernels for reconstruct/project, Linear and ConvNd (see
docs/kernels/triton.md). One module per op family: ``reconstruct``, ``linear``, ``conv``, with the
skinny channel GEMMs they share in ``channel_gemm``.

Importing this package never fails for want of triton: without it, or without a CUDA GPU and
the interpreter, the backend reports why in ``unavailable_reason`` and imports neither triton nor
its kernel modules (they cost a model's first step ~0.1 s of CPU). The
registry imports this package at first use, so TRITON_INTERPRET=1 only has to be set before that.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import Tensor

from ...convspec import ConvSpec
from ..base import Backend, Call


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_KERNELS: list[SimpleNamespace] = []


def _kernels() -> SimpleNamespace:
    """The kernel modules: imported with this package where the backend can run, else at first use
    (tools.compile_check compiles them without a device)."""
    if not _KERNELS:
        from . import _common, conv, conv_igemm, linear, reconstruct

        _KERNELS.append(SimpleNamespace(conv=conv, linear=linear, reconstruct=reconstruct, max_rank=_common.MAX_RANK,
                                        igemm_reason=conv_igemm.unsupported_reason))
    return _KERNELS[0]


# Why the backend cannot run here, decided once at import: no device (checked first, without
# importing triton), or triton failing to import.
_UNAVAILABLE: str | None = (
    None if torch.cuda.is_available() or _interpret() else "no CUDA GPU and TRITON_INTERPRET is not set"
)
if _UNAVAILABLE is None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure to import triton makes the backend unavailable
        _UNAVAILABLE = f"triton is not importable ({type(e).__name__}: {e})"
    else:
        _kernels()


_OFF_GPU_DEFAULT = {"linear": "tiled", "conv": "cudnn"}  # the variant auto takes off CUDA


def _tma_reason(call: Call, on_gpu: bool) -> str | None:
    """Why the TMA GEMM cannot serve a factorized Linear call (both GEMMs: y = x W^T and dx = dy W):
    compute capability 9.0+ (``on_gpu``; the interpreter checks the layout only), contiguous x and
    weight, 16-byte aligned rows."""
    if on_gpu:
        major, minor = torch.cuda.get_device_capability(torch.device(call.device))
        if major < 9:
            return f"TMA needs compute capability >= 9.0, got {major}.{minor}"
    x, w = call.x, call.weight
    if x.layout != "contiguous" or w.layout != "contiguous":
        return f"TMA needs contiguous x and weight, got {x.layout} and {w.layout}"
    elt = x.dtype.itemsize
    if (w.shape[0] * elt) % 16 or (w.shape[1] * elt) % 16:
        return f"TMA needs rows of a multiple of 16 bytes, got in/out features {w.shape[1]}/{w.shape[0]} in {x.dtype}"
    return None


class TritonBackend(Backend):
    """Differentiable FLoRA ops over Triton kernels (CUDA GPUs; CPU tensors only through the
    interpreter, TRITON_INTERPRET=1, which ``auto`` never picks).

    Linear/conv on the factorized path treat the base weight and bias as frozen: no weight
    gradient is computed, so a call whose weight requires grad is refused (use "reference").

    Variants (``variants``; the dispatcher measures them, the default first): the factorized
    Linear's GEMMs ``linear.GEMM_VARIANTS`` ("tma": the persistent TMA kernel, sm_90+; "tiled";
    "cublas": torch.addmm plus a pass adding the rank part), the factorized conv's
    ``conv.CONV_VARIANTS`` ("cudnn": torch's base conv + Triton passes; "igemm": one implicit GEMM).
    Under the interpreter or off CUDA auto takes the default ("tiled", "cudnn"): timings there
    mean nothing; a forced variant still runs.
    """

    name = "triton"
    how_to_get = (
        "pip install triton (or flora_kernels[triton]) on a machine with a CUDA GPU; "
        "for CPU tests set TRITON_INTERPRET=1 before importing flora_kernels"
    )

    def unavailable_reason(self) -> str | None:
        return _UNAVAILABLE

    def unsupported_reason(self, call: Call) -> str | None:
        for t in call.tensors:
            if t.device_type == "cpu" and not _interpret():
                return "CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before importing flora_kernels)"
            if t.device_type not in ("cpu", "cuda"):
                return f"tensors on {t.device_type} are not supported (CUDA, or CPU under the interpreter)"
            if t.dtype == torch.float64:
                return "float64 is not supported (fp32, fp16, bf16)"
            if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                return f"dtype {t.dtype} is not supported (fp32, fp16, bf16)"
            if t.dtype == torch.bfloat16 and (t.device_type == "cpu" or _interpret()):
                return "bfloat16 is computed wrongly by the Triton CPU interpreter; use a GPU or fp16/fp32"
        if call.op == "project":
            modes, ranks = call.x.dim, tuple(f.shape[1] for f in call.factors[:2])
        else:  # reconstruct, linear, conv: the core's modes and channel ranks
            modes, ranks = call.core.dim, tuple(call.core.shape[:2])
        if not 2 <= modes <= 5:
            return f"expected 2 to 5 modes, got {modes}"
        if max(ranks) > _kernels().max_rank:
            return f"channel ranks {ranks} exceed the kernels' limit of {_kernels().max_rank}"
        if call.op in ("linear", "conv"):
            x, weight = call.x, call.weight
            if x.dtype != weight.dtype:
                return f"expected x and weight of one dtype, got {x.dtype} and {weight.dtype}"
            if weight.requires_grad and call.grad_enabled:
                return "the factorized kernels treat the base weight as frozen, but weight.requires_grad is True"
        return None

    def variants(self, call: Call) -> tuple[str, ...]:
        if call.strategy != "factorized":
            return ()
        return {"linear": _kernels().linear.GEMM_VARIANTS, "conv": _kernels().conv.CONV_VARIANTS}.get(call.op, ())

    def variant_reason(self, call: Call, variant: str, auto: bool = False) -> str | None:
        declared = self.variants(call)
        if variant not in declared:
            return f"expected one of {declared}, got {variant!r}"
        on_gpu = call.device_type == "cuda" and not _interpret()
        if auto and not on_gpu and variant != _OFF_GPU_DEFAULT[call.op]:
            return "off CUDA (the interpreter) auto takes the default variant: timings there mean nothing"
        if variant == "tma":
            return _tma_reason(call, on_gpu)
        if variant == "igemm":
            return _kernels().igemm_reason(call.x.dim, call.conv, call.weight.shape[1])
        return None

    def auto_reason(self, call: Call) -> str | None:
        if _interpret():
            return "TRITON_INTERPRET is set: auto does not pick the CPU interpreter"
        if any(t.device_type != "cuda" for t in call.tensors):
            return "tensors are not on a CUDA device"
        return self.unsupported_reason(call)

    def reconstruct(self, core: Tensor, factors: Sequence[Tensor], scale: float, base: Tensor | None) -> Tensor:
        return _kernels().reconstruct.reconstruct(core, factors, scale, base)

    def project(self, t: Tensor, factors: Sequence[Tensor]) -> Tensor:
        return _kernels().reconstruct.project(t, factors)

    def linear(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
        scale: float, dropout_p: float,
    ) -> Tensor:
        return _kernels().linear.linear_factorized(x, weight, bias, core, factors, scale, dropout_p, self.variant or "tiled")

    def conv(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
        scale: float, spec: ConvSpec, dropout_p: float,
    ) -> Tensor:
        return _kernels().conv.conv_factorized(x, weight, bias, core, factors, scale, spec, dropout_p, self.variant or "cudnn")


__all__ = ["TritonBackend"]

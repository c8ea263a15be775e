"""Shared helpers for the Triton backend tests (no tests here): one tolerance table per dtype,
bounding the kernel's error against an fp64 oracle by a multiple of PyTorch's own error in
that dtype, and skip markers."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor

from flora_kernels.backends import available_backends

TRITON_OK = available_backends()["triton"] == "ok"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=f"triton backend: {available_backends()['triton']}")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"

# dtype -> (mult, atol): |kernel - fp64| <= mult * |torch in dtype - fp64| + atol * max(1, |fp64|)
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (4.0, 2e-6),
    torch.float16: (4.0, 2e-3),
    torch.bfloat16: (4.0, 1e-2),
}
DTYPES = [torch.float32, torch.float16]
DTYPE_IDS = ["fp32", "fp16"]


def assert_bounded(out: Tensor, ref_lo: Tensor, ref_hi: Tensor, dtype: torch.dtype, what: str) -> None:
    """Kernel output ``out`` vs the fp64 oracle ``ref_hi``, bounded by torch's own error ``ref_lo``."""
    assert out.shape == ref_hi.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref_hi.shape)}"
    hi = ref_hi.detach().double()
    err_k = (out.detach().double() - hi).abs().max().item() if out.numel() else 0.0
    err_t = (ref_lo.detach().double() - hi).abs().max().item() if out.numel() else 0.0
    mult, atol = TOL[dtype]
    scale = max(1.0, hi.abs().max().item() if out.numel() else 0.0)
    bound = mult * err_t + atol * scale
    assert err_k <= bound, (
        f"{what} ({dtype}): max abs err {err_k:.3e} > bound {bound:.3e} (torch's own err {err_t:.3e}, "
        f"max |ref| {scale:.3e})"
    )


def run_and_grads(
    fn: Callable[..., Tensor], inputs: Sequence[Tensor | None], dy: Tensor
) -> tuple[Tensor, list[Tensor | None]]:
    """Output of ``fn(*inputs)`` and the gradients of <out, dy> for every input that requires grad."""
    out = fn(*inputs)
    wrt = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wrt, dy.to(out.dtype)))
    return out, [next(grads) if isinstance(t, Tensor) and t.requires_grad else None for t in inputs]


def copies(inputs: Sequence[Tensor | None], dtype: torch.dtype) -> list[Tensor | None]:
    """Leaf copies of ``inputs`` in ``dtype`` keeping each one's requires_grad and memory layout."""
    out: list[Tensor | None] = []
    for t in inputs:
        if t is None:
            out.append(None)
            continue
        c = torch.empty_like(t, dtype=dtype).copy_(t.detach())
        out.append(c.requires_grad_(t.requires_grad))
    return out


def compare(
    kernel_fn: Callable[..., Tensor], ref_fn: Callable[..., Tensor], inputs: Sequence[Tensor | None],
    dtype: torch.dtype, names: Sequence[str],
) -> None:
    """Output and every gradient of ``kernel_fn`` vs ``ref_fn`` (fp64 oracle, bounded by torch in dtype)."""
    lo = copies(inputs, dtype)
    hi = copies(inputs, torch.float64)
    out_hi = ref_fn(*hi)
    dy = torch.randn(out_hi.shape, dtype=torch.float64, device=out_hi.device)
    out_k, g_k = run_and_grads(kernel_fn, copies(inputs, dtype), dy)
    out_t, g_t = run_and_grads(ref_fn, lo, dy)
    out_h, g_h = run_and_grads(ref_fn, hi, dy)
    assert out_k.dtype == out_t.dtype, f"output dtype {out_k.dtype} != reference {out_t.dtype}"
    assert_bounded(out_k, out_t, out_h, dtype, "output")
    for name, a, b, c in zip(names, g_k, g_t, g_h):
        if c is not None:
            assert a is not None, f"no gradient for {name}"
            assert_bounded(a, b, c, dtype, f"grad {name}")

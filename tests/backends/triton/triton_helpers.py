"""Shared helpers for the Triton backend tests (no tests here): skip markers, runners, and
``assert_bounded`` (``flora_kernels.testing``'s float64 rule, elementwise; re-exported here)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor

from flora_kernels.backends import available_backends
from flora_kernels.testing import assert_bounded

TRITON_OK = available_backends()["triton"] == "ok"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=f"triton backend: {available_backends()['triton']}")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"

DTYPES = [torch.float32, torch.float16]
DTYPE_IDS = ["fp32", "fp16"]


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


#: aten ops that only allocate or alias memory (no kernel runs): allowed anywhere in a step.
ALLOC_OPS = frozenset({"aten::empty", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
                       "aten::empty_like", "aten::lift_fresh", "aten::detach"})


def assert_compiles_like_eager(fn: Callable[..., Tensor], inputs: Sequence[Tensor]) -> None:
    """``torch.compile(fn, backend="aot_eager", fullgraph=True)`` gives eager's output and the
    gradients of every input for one random output gradient (fp32 rounding apart)."""
    y_c = torch.compile(fn, backend="aot_eager", fullgraph=True)(*inputs)
    y_e = fn(*inputs)
    dy = torch.randn_like(y_e)
    for a, b in zip([y_c, *torch.autograd.grad(y_c, inputs, dy)], [y_e, *torch.autograd.grad(y_e, inputs, dy)]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _aliases(out: object, src: object) -> bool:
    """Whether the op's output is (a view of) its first argument's memory (``aten::to`` is a
    view op that copies when the dtype changes)."""
    return (isinstance(out, Tensor) and isinstance(src, Tensor)
            and out.untyped_storage().data_ptr() == src.untyped_storage().data_ptr())


def count_step_ops(step: Callable[[], object]) -> tuple[list[str], list[str]]:
    """(Triton kernel launches, aten compute ops) that ``step()`` issues, in order.

    Launches are counted at ``kernel[grid](...)`` (an autotuned kernel once). Aten ops are seen by
    a dispatch mode that also runs each ``flora_triton`` custom op's implementation under itself
    (a mode does not see inside a custom op otherwise); ops issued while a kernel launch is in
    progress (the interpreter's own copies) and allocation / view ops (ALLOC_OPS, ``is_view`` ops
    whose output aliases their input) are not counted."""
    from torch._library.custom_ops import OPDEFS
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime import jit

    launches: list[str] = []
    ops: list[str] = []
    in_kernel = [0]
    saved = jit.KernelInterface.__getitem__

    def getitem(kernel, grid):
        run = saved(kernel, grid)

        def launch(*args, **kwargs):
            fn = getattr(kernel, "fn", kernel)
            launches.append(getattr(fn, "__name__", type(fn).__name__))
            in_kernel[0] += 1
            try:
                return run(*args, **kwargs)
            finally:
                in_kernel[0] -= 1

        return launch

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            kwargs = kwargs or {}
            if name.startswith("flora_triton::"):
                with self:
                    return OPDEFS[name]._init_fn(*args, **kwargs)
            out = func(*args, **kwargs)
            if not in_kernel[0] and name not in ALLOC_OPS and not (func.is_view and _aliases(out, args[0])):
                ops.append(name)
            return out

    jit.KernelInterface.__getitem__ = getitem
    try:
        with Count():
            step()
    finally:
        jit.KernelInterface.__getitem__ = saved
    return launches, ops

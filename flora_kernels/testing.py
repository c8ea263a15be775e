"""How a fast path is judged against the reference path: one tolerance table, one error
measure, one float64 rule. Used by measured dispatch (verifying candidates), the benchmark
(checking providers) and the tests.

- ``rel_err(out, ref)``: ``||out - ref|| / ||ref||`` in float64 (inf for a shape mismatch or a
  non-finite value).
- ``tolerance(dtype, device_type)``: the relative-norm error a candidate computing in ``dtype``
  may show against the reference path run in the same dtype (fp32 on CUDA allows TF32).
- ``within_reference_error(errs_vs_exact, ref_errs_vs_exact, tol)``: the float64 rule. Where a
  candidate misses the tolerance against the reference path (low precision, autocast, a
  gradient that nearly cancels), both are judged against the reference path run in float64:
  the candidate passes if it is within ``SLACK`` times the reference path's own error (or the
  tolerance) of that oracle.
- ``assert_close(actual, expected, dtype)``: the elementwise check of the tests, per dtype
  (``ELEMENTWISE``: rtol, and atol relative to max(1, max |expected|)), with the errors in the
  message.
- ``assert_bounded(out, ref_lo, ref_hi, dtype, what)``: the float64 rule elementwise, for kernels
  whose rounding differs from torch's: max |out - fp64| <= SLACK * max |torch in dtype - fp64|
  + ``BOUNDED_ATOL[dtype]`` * max(1, max |fp64|).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# Relative-norm error against the reference path, per compute dtype.
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-8,
    torch.float32: 1e-3,
    torch.float16: 2e-2,
    torch.bfloat16: 5e-2,
}
TOLERANCE_FP32_CUDA = 1e-2  # TF32 matmuls
SLACK = 4.0
# assert_bounded's absolute slack per dtype (for values of order 1).
BOUNDED_ATOL: dict[torch.dtype, float] = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Elementwise (rtol, atol) per dtype, atol for values of order 1 (scaled by max(1, max |expected|)).
# fp16/bf16 are loose on purpose: the reference path computes in the input dtype, so its own
# error is torch's rounding in that dtype, a few ulps times the number of accumulated terms.
ELEMENTWISE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 5e-3),
    torch.bfloat16: (5e-2, 3e-2),
}


def tolerance(dtype: torch.dtype, device_type: str = "cpu") -> float:
    """The relative-norm tolerance of a computation in ``dtype`` on ``device_type``."""
    if dtype == torch.float32 and device_type == "cuda":
        return TOLERANCE_FP32_CUDA
    return TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])


def rel_err(out: Tensor | None, ref: Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; inf for a missing, mis-shaped or non-finite output."""
    if out is None or tuple(out.shape) != tuple(ref.shape):
        return math.inf
    o = out.detach().to(device=ref.device, dtype=torch.float64)
    if not torch.isfinite(o).all():
        return math.inf
    r = ref.detach().to(torch.float64)
    return float((o - r).norm() / r.norm().clamp_min(1e-300))


def rel_errs(outs: Sequence[Tensor | None], refs: Sequence[Tensor]) -> list[float]:
    """``rel_err`` per pair (the lists must have equal length)."""
    return [rel_err(o, r) for o, r in zip(outs, refs, strict=True)]


def within_reference_error(
    errs_vs_exact: Sequence[float], ref_errs_vs_exact: Sequence[float], tol: float
) -> tuple[bool, float, float]:
    """The float64 rule: each tensor's error against the float64 oracle is at most
    ``max(tol, SLACK * the reference path's own error)``.

    Returns (passes, the worst error, the bound it was held to).
    """
    bounds = [max(tol, SLACK * e) for e in ref_errs_vs_exact]
    worst = max(range(len(bounds)), key=lambda i: errs_vs_exact[i] / bounds[i])
    return errs_vs_exact[worst] <= bounds[worst], errs_vs_exact[worst], bounds[worst]


def assert_close(
    actual: Tensor, expected: Tensor, dtype: torch.dtype | None = None, rtol: float | None = None,
    atol: float | None = None, msg: str = "",
) -> None:
    """|actual - expected| <= atol * max(1, max |expected|) + rtol * |expected| elementwise, with
    ``ELEMENTWISE[dtype]`` (default: expected's dtype) unless ``rtol`` / ``atol`` are given; the
    failure names the max abs / rel and the norm-relative error."""
    dt = dtype or expected.dtype
    r, a = ELEMENTWISE.get(dt, ELEMENTWISE[torch.float32])
    rtol, atol = (r if rtol is None else rtol), (a if atol is None else atol)
    assert tuple(actual.shape) == tuple(expected.shape), f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    got, want = actual.detach().to(torch.float64), expected.detach().to(device=actual.device, dtype=torch.float64)
    if want.numel() == 0:
        return
    scale = max(1.0, want.abs().max().item())
    diff = (got - want).abs()
    if not bool((diff <= atol * scale + rtol * want.abs()).all()):
        mrel = (diff / want.abs().clamp_min(torch.finfo(torch.float64).tiny)).max().item()
        raise AssertionError(
            f"{msg}: not close (dtype {dt}, rtol={rtol}, atol={atol} x {scale:.3g}): max abs err "
            f"{diff.max().item():.3e}, max rel err {mrel:.3e}, norm-rel err {rel_err(actual, expected):.3e}, "
            f"shape {tuple(actual.shape)}, dtypes {actual.dtype}/{expected.dtype}"
        )


def assert_bounded(out: Tensor, ref_lo: Tensor, ref_hi: Tensor, dtype: torch.dtype, what: str) -> None:
    """Kernel output ``out`` vs the fp64 oracle ``ref_hi``, bounded by torch's own error ``ref_lo``
    (the same computation in ``dtype``): the float64 rule, elementwise (module doc)."""
    assert out.shape == ref_hi.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref_hi.shape)}"
    hi = ref_hi.detach().double()
    err_k = (out.detach().double() - hi).abs().max().item() if out.numel() else 0.0
    err_t = (ref_lo.detach().double() - hi).abs().max().item() if out.numel() else 0.0
    scale = max(1.0, hi.abs().max().item() if out.numel() else 0.0)
    bound = SLACK * err_t + BOUNDED_ATOL[dtype] * scale
    assert err_k <= bound, (
        f"{what} ({dtype}): max abs err {err_k:.3e} > bound {bound:.3e} (torch's own err {err_t:.3e}, "
        f"max |ref| {scale:.3e})"
    )

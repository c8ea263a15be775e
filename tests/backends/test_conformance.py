"""Conformance: every candidate the dispatcher knows that can run on this machine (backend x
strategy x kernel variant, from ``autotune.candidates(..., auto_only=False)``: the reference, the
C++ kernels, Triton under its interpreter) computes the output and every gradient of the same
calls as the reference path run in float64, within ``flora_kernels.testing``'s tolerance of the
dtype: odd shapes, fp32 and fp16, contiguous and channels_last. Each candidate runs through the
public functional API with ``force_dispatch`` naming it, so a new backend or variant is tested
here without a line of test code."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import flora_kernels as fk
from flora_kernels.backends import Call
from flora_kernels.backends import autotune as at
from flora_kernels.testing import rel_errs, tolerance

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")

SPEC = fk.ConvSpec.make((3, 3), stride=1, padding=1)


def _linear_tensors(dtype: torch.dtype, layout: str) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 13, generator=g)  # 15 tokens, 13 -> 11 features, ranks (3, 5)
    w, b = torch.randn(11, 13, generator=g) / 13**0.5, torch.randn(11, generator=g)
    core = torch.randn(3, 5, generator=g)
    fs = [torch.randn(11, 3, generator=g) / 3**0.5, torch.randn(13, 5, generator=g) / 5**0.5]
    return [t.to(dtype) for t in (x, w, b, core, *fs)]


def _conv_tensors(dtype: torch.dtype, layout: str) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 5, 7, 6, generator=g)
    w, b = torch.randn(6, 5, 3, 3, generator=g) / 45**0.5, torch.randn(6, generator=g)
    core = torch.randn(3, 2, 2, 2, generator=g)
    fs = [torch.randn(n, r, generator=g) / r**0.5 for n, r in ((6, 3), (5, 2), (3, 2), (3, 2))]
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return [x, *(t.to(dtype) for t in (w, b, core, *fs))]


def _reconstruct_tensors(dtype: torch.dtype, layout: str) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(9)
    core = torch.randn(3, 2, 2, 3, generator=g)
    fs = [torch.randn(n, r, generator=g) for n, r in ((7, 3), (5, 2), (3, 2), (4, 3))]
    return [t.to(dtype) for t in (core, *fs)]


def _linear(t: list, backend: str = "auto") -> torch.Tensor:
    x, w, b, core, *fs = t
    return fk.flora_linear(x, w, b, core, fs, 0.7, backend=backend)


def _conv(t: list, backend: str = "auto") -> torch.Tensor:
    x, w, b, core, *fs = t
    return fk.flora_conv(x, w, b, core, fs, 0.7, padding=1, backend=backend)


def _reconstruct(t: list, backend: str = "auto") -> torch.Tensor:
    core, *fs = t
    return fk.tucker_reconstruct(core, fs, 0.7, backend=backend)


def _call(op: str, t: list) -> Call:
    if op == "reconstruct":
        return Call.describe("reconstruct", core=t[0], factors=t[1:])
    x, w, b, core, *fs = t
    return Call.describe(op, x=x, weight=w, bias=b, core=core, factors=fs, conv=SPEC if op == "conv" else None,
                         strategy="auto")


OPS: dict[str, tuple[Callable, Callable]] = {
    "linear": (_linear_tensors, _linear), "conv": (_conv_tensors, _conv), "reconstruct": (_reconstruct_tensors, _reconstruct),
}
CASES = [(op, dt, lay) for op in OPS for dt in (torch.float32, torch.float16)
         for lay in (("contiguous", "channels_last") if op == "conv" else ("contiguous",))]


def _params() -> list:
    out = []
    for op, dt, lay in CASES:
        call = _call(op, OPS[op][0](dt, lay))
        for c in at.candidates(call, "auto", auto_only=False):
            out.append(pytest.param(op, dt, lay, c.label, id=f"{op}-{str(dt)[6:]}-{lay}-{c.label}"))
    return out


@pytest.fixture(autouse=True)
def _fresh():
    at.clear_autotune_cache()
    yield
    at.force_dispatch(None)
    at.clear_autotune_cache()


@pytest.mark.parametrize(("op", "dtype", "layout", "label"), _params())
def test_candidate_matches_the_reference(op, dtype, layout, label):
    make, run = OPS[op]
    base = make(dtype, layout)
    leaves = [t.detach().requires_grad_(i != 1 or op == "reconstruct") for i, t in enumerate(base)]
    at.force_dispatch(label)
    with fk.record_dispatch() as rep:
        y = run(leaves)
    assert rep[""][0].label == label  # the dispatcher ran this candidate
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    wrt = [t for t in leaves if t.requires_grad]
    got = [y, *torch.autograd.grad(y, wrt, dy)]
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    at.force_dispatch(None)
    y64 = run(exact, backend="reference")
    want = [y64, *torch.autograd.grad(y64, [t for t in exact if t.requires_grad], dy.double())]
    errs = rel_errs(got, want)
    assert max(errs) <= tolerance(dtype), f"{label}: relative errors {errs} (output, then gradients)"

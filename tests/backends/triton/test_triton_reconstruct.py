"""Triton reconstruct / project (N = 2..5) and their adjoint kernels vs flora_kernels.tucker."""

from __future__ import annotations

import pytest
import torch
from triton_helpers import DEVICE, DTYPE_IDS, DTYPES, assert_bounded, compare, needs_triton
from torch.library import opcheck

import flora_kernels as fk
from flora_kernels.tucker import tucker_project, tucker_reconstruct

pytestmark = [needs_triton, pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")]

# (id, weight shape, ranks): rank 1, full rank, non-powers of two, ragged tails past one block
SHAPES = [
    ("2d-37x21", (37, 21), (5, 3)),
    ("2d-rank1", (9, 40), (1, 1)),
    ("2d-full", (6, 4), (6, 4)),
    ("3d", (11, 7, 3), (4, 2, 2)),
    ("4d-conv", (9, 7, 3, 3), (4, 2, 2, 3)),
    ("5d-conv3d", (5, 7, 3, 2, 2), (2, 3, 2, 1, 2)),
]
SHAPE_IDS = [s[0] for s in SHAPES]


def _tucker(shape, ranks, grad=True):
    core = torch.randn(ranks, device=DEVICE).requires_grad_(grad)
    factors = [(torch.randn(i, r, device=DEVICE) / r**0.5).requires_grad_(grad) for i, r in zip(shape, ranks)]
    return core, factors


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_base", [False, True], ids=["nobase", "base"])
@pytest.mark.parametrize("case", SHAPES, ids=SHAPE_IDS)
def test_reconstruct(case, with_base, dtype):
    _, shape, ranks = case
    core, factors = _tucker(shape, ranks)
    base = torch.randn(shape, device=DEVICE, requires_grad=True) if with_base else None
    n = len(shape)

    def kern(core, *rest):
        return fk.tucker_reconstruct(core, rest[:n], 0.7, rest[n], backend="triton")

    def ref(core, *rest):
        return tucker_reconstruct(core, rest[:n], 0.7, rest[n])

    names = ["core"] + [f"factors[{i}]" for i in range(n)] + ["base"]
    compare(kern, ref, [core, *factors, base], dtype, names)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", SHAPES, ids=SHAPE_IDS)
def test_project(case, dtype):
    _, shape, ranks = case
    _, factors = _tucker(shape, ranks)
    t = torch.randn(shape, device=DEVICE, requires_grad=True)
    n = len(shape)
    compare(
        lambda t, *fs: fk.tucker_project(t, fs, backend="triton"), lambda t, *fs: tucker_project(t, fs),
        [t, *factors], dtype, ["t"] + [f"factors[{i}]" for i in range(n)],
    )


def test_reconstruct_base_dtype_and_noncontiguous():
    """Output in base.dtype (fp16 base, fp32 adapter); transposed (non-contiguous) base and factors."""
    core, factors = _tucker((13, 9), (3, 2), grad=False)
    factors = [f.t().contiguous().t() for f in factors]
    base = torch.randn(9, 13, device=DEVICE).t()
    out = fk.tucker_reconstruct(core, factors, 1.5, base, backend="triton")
    ref = tucker_reconstruct(core, factors, 1.5, base)
    assert out.dtype == torch.float32
    assert_bounded(out, ref, ref.double(), torch.float32, "strided base")
    out16 = fk.tucker_reconstruct(core, factors, 1.5, base.half(), backend="triton")
    assert out16.dtype == torch.float16
    hi = tucker_reconstruct(core.double(), [f.double() for f in factors], 1.5, base.half().double())
    assert (out16.double() - hi).abs().max().item() <= 2e-3 * hi.abs().max().item()


@pytest.mark.parametrize("split", [1, 2, 3])
def test_adjoint_split(split):
    """The adjoint's split reductions (several programs per output, partials summed) agree."""
    from flora_kernels.backends.triton.reconstruct import tucker2_adjoint

    g = torch.randn(70, 66, 2, device=DEVICE)
    u0, k, u1 = torch.randn(70, 3, device=DEVICE), torch.randn(3, 5, 2, device=DEVICE), torch.randn(66, 5, device=DEVICE)
    du0, dk, du1 = tucker2_adjoint(g, u0, k, u1, 0.5, True, True, True, split=split)
    gd, u0d, kd, u1d = g.double(), u0.double(), k.double(), u1.double()
    assert_bounded(du0, du0, 0.5 * torch.einsum("ijt,jb,abt->ia", gd, u1d, kd), torch.float32, "dU0")
    assert_bounded(dk, dk, 0.5 * torch.einsum("ia,ijt,jb->abt", u0d, gd, u1d), torch.float32, "dK")
    assert_bounded(du1, du1, 0.5 * torch.einsum("ijt,ia,abt->jb", gd, u0d, kd), torch.float32, "dU1")


def test_opcheck_reconstruct_ops():
    from flora_kernels.backends.triton import reconstruct as R

    def rq(*s):
        return torch.randn(*s, device=DEVICE, requires_grad=True)

    opcheck(R.tucker2, (rq(9, 3), rq(3, 2, 4), rq(7, 2), rq(9, 7, 4), 0.5))
    opcheck(R.tucker2, (rq(9, 3), rq(3, 2, 1), rq(7, 2), None, 1.0))
    opcheck(R.project2, (rq(9, 7, 4), rq(9, 3), rq(7, 2)))
    g = torch.randn(9, 7, 4, device=DEVICE)
    opcheck(R.tucker2_adjoint_op, (g, rq(9, 3).detach(), rq(3, 2, 4).detach(), rq(7, 2).detach(), 0.5, True, True, True))
    opcheck(R.tucker2_adjoint_op, (g, rq(9, 3).detach(), None, rq(7, 2).detach(), 1.0, False, True, False))

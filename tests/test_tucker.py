"""Tucker algebra: reconstruct/project against einsum, mode-n product, contraction order,
adjointness, fp64 gradcheck, init, validation messages."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import flora_kernels as fk
from flora_kernels import tucker as tk
from helpers import assert_close, einsum_project, einsum_reconstruct

# (full shape, ranks) per N: odd sizes, rank 1, ranks equal to the mode size.
SHAPES = {
    2: [((7, 5), (3, 2)), ((4, 9), (1, 9))],
    3: [((6, 5, 3), (2, 3, 3)), ((5, 1, 4), (5, 1, 1))],
    4: [((6, 4, 3, 3), (3, 2, 3, 2)), ((5, 3, 2, 5), (1, 3, 2, 1))],
    5: [((4, 3, 3, 2, 3), (2, 2, 3, 1, 2))],
}
CASES = [(n, full, ranks) for n, v in SHAPES.items() for full, ranks in v]
IDS = [f"N{n}-{'x'.join(map(str, f))}-r{'x'.join(map(str, r))}" for n, f, r in CASES]


def _rand(full: tuple[int, ...], ranks: tuple[int, ...], dtype=torch.float32):
    core = torch.randn(ranks, dtype=dtype)
    factors = [torch.randn(i, r, dtype=dtype) for i, r in zip(full, ranks)]
    return core, factors


@pytest.mark.parametrize("n,full,ranks", CASES, ids=IDS)
@pytest.mark.parametrize("scale", [1.0, -0.37], ids=["s1", "s-0.37"])
@pytest.mark.parametrize("with_base", [False, True], ids=["nobase", "base"])
@pytest.mark.parametrize("api", ["tucker", "public"])
def test_reconstruct_matches_einsum(n, full, ranks, scale, with_base, api):
    core, factors = _rand(full, ranks)
    base = torch.randn(full) if with_base else None
    fn = tk.tucker_reconstruct if api == "tucker" else fk.tucker_reconstruct
    out = fn(core, factors, scale, base)
    want = einsum_reconstruct(core.double(), [f.double() for f in factors], scale)
    if with_base:
        want = want + base.double()
    assert out.shape == full and out.dtype == torch.float32
    assert_close(out, want.float(), torch.float32, rtol=1e-5, atol=1e-4, msg="reconstruct")


@pytest.mark.parametrize("n,full,ranks", CASES, ids=IDS)
@pytest.mark.parametrize("api", ["tucker", "public"])
def test_project_matches_einsum(n, full, ranks, api):
    _, factors = _rand(full, ranks)
    t = torch.randn(full)
    fn = tk.tucker_project if api == "tucker" else fk.tucker_project
    out = fn(t, factors)
    want = einsum_project(t.double(), [f.double() for f in factors])
    assert out.shape == ranks
    assert_close(out, want.float(), torch.float32, rtol=1e-5, atol=1e-4, msg="project")


def test_reconstruct_base_dtype():
    core, factors = _rand((5, 4, 3), (2, 2, 3))
    base = torch.randn(5, 4, 3, dtype=torch.float64)
    out = fk.tucker_reconstruct(core, factors, 2.0, base)
    assert out.dtype == torch.float64
    assert_close(out, base + einsum_reconstruct(core, factors, 2.0).double(), torch.float32)


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_mode_n_product(n):
    t = torch.randn(3, 4, 5, 2, dtype=torch.float64)
    m = torch.randn(7, t.shape[n], dtype=torch.float64)
    letters = "abcd"
    out_letters = letters.replace(letters[n], "z")
    want = torch.einsum(f"{letters},z{letters[n]}->{out_letters}", t, m)
    out = tk.mode_n_product(t, m, n)
    assert out.shape == want.shape
    assert_close(out, want, torch.float64)


def _order_cost(order, src, dst):
    cur, cost = list(src), 0
    for n in order:
        cost += math.prod(cur) * dst[n]
        cur[n] = dst[n]
    return cost


@pytest.mark.parametrize(
    "src,dst",
    [((2, 3), (50, 7)), ((3, 2, 3, 3), (64, 32, 3, 3)), ((16, 1, 2, 5, 3), (17, 40, 2, 9, 3)),
     ((64, 32, 3, 3), (3, 2, 3, 1)), ((5, 5, 5), (5, 5, 5))],
    ids=["N2-up", "N4-up", "N5-up", "N4-down", "N3-square"],
)
def test_contraction_order_is_cheapest(src, dst):
    order = tk.contraction_order(src, dst)
    assert sorted(order) == list(range(len(src)))
    brute = min(_order_cost(p, src, dst) for p in itertools.permutations(range(len(src))))
    assert _order_cost(order, src, dst) == brute
    # Independent check of the cost formula: count the multiply-adds of a real contraction.
    if src == (2, 3):
        assert _order_cost((0, 1), src, dst) == 2 * 3 * 50 + 50 * 3 * 7


@pytest.mark.parametrize("n,full,ranks", CASES, ids=IDS)
def test_project_is_adjoint_of_reconstruct(n, full, ranks):
    core, factors = _rand(full, ranks, torch.float64)
    t = torch.randn(full, dtype=torch.float64)
    lhs = (fk.tucker_reconstruct(core, factors) * t).sum()
    rhs = (core * fk.tucker_project(t, factors)).sum()
    assert_close(lhs, rhs, torch.float64, rtol=1e-9, atol=1e-9, msg="<R(G), T> vs <G, P(T)>")


GRAD_CASES = [
    ((4, 3), (2, 3)), ((3, 4, 2), (2, 1, 2)), ((3, 2, 2, 3), (2, 2, 1, 2)), ((2, 3, 2, 2, 2), (1, 2, 2, 1, 2)),
]


@pytest.mark.parametrize("full,ranks", GRAD_CASES, ids=[f"N{len(f)}" for f, _ in GRAD_CASES])
def test_gradcheck_reconstruct_and_project(full, ranks):
    core, factors = _rand(full, ranks, torch.float64)
    base = torch.randn(full, dtype=torch.float64)
    t = torch.randn(full, dtype=torch.float64)
    core.requires_grad_(True)
    base.requires_grad_(True)
    t.requires_grad_(True)
    for f in factors:
        f.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c, b, *fs: fk.tucker_reconstruct(c, fs, 0.7, b), (core, base, *factors))
    assert torch.autograd.gradcheck(lambda x, *fs: fk.tucker_project(x, fs), (t, *factors))


def test_init_is_the_papers():
    core = torch.empty(4, 8, 3)
    factors = [torch.empty(300, 4), torch.empty(200, 8), torch.empty(3000, 3)]
    tk.init_tucker_(core, factors)
    assert torch.equal(core, torch.zeros_like(core))
    for f in factors:
        want = 1.0 / math.sqrt(2 * f.shape[1])
        assert abs(f.std().item() - want) < 0.08 * want, (f.shape, f.std().item(), want)
        assert abs(f.mean().item()) < 0.1 * want
    small = [torch.empty(5, 4), torch.empty(7, 8), torch.empty(3, 3)]
    tk.init_tucker_(core, small)
    assert torch.equal(fk.tucker_reconstruct(core, small), torch.zeros(5, 7, 3))


def test_clamp_ranks():
    assert tk.clamp_ranks((8, 3, 3, 1), (4, 4, 5, 2)) == (4, 3, 3, 1)


@pytest.mark.parametrize("api", ["tucker", "public"])
def test_reconstruct_bad_shapes(api):
    fn = tk.tucker_reconstruct if api == "tucker" else fk.tucker_reconstruct
    core = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"factors\[1\]: expected shape \(I_1, 2\).*got \(5, 3\)"):
        fn(core, [torch.randn(4, 3), torch.randn(5, 3)])
    with pytest.raises(ValueError, match=r"expected one factor per mode.*got 1"):
        fn(core, [torch.randn(4, 3)])
    with pytest.raises(ValueError, match=r"expected 2 to 5 modes, got a 1-D tensor"):
        fn(torch.randn(3), [torch.randn(4, 3)])
    with pytest.raises(ValueError, match=r"base: expected shape \(4, 5\).*got \(5, 4\)"):
        fn(core, [torch.randn(4, 3), torch.randn(5, 2)], 1.0, torch.randn(5, 4))


@pytest.mark.parametrize("api", ["tucker", "public"])
def test_project_bad_shapes(api):
    fn = tk.tucker_project if api == "tucker" else fk.tucker_project
    with pytest.raises(ValueError, match=r"factors\[0\]: expected shape \(4, r_0\).*got \(5, 2\)"):
        fn(torch.randn(4, 6), [torch.randn(5, 2), torch.randn(6, 2)])
    with pytest.raises(ValueError, match=r"one factor per mode, got shape \(4, 6\) and 3 factors"):
        fn(torch.randn(4, 6), [torch.randn(4, 2)] * 3)

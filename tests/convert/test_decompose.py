"""tucker_decompose / tucker_rerank: exactness at the true multilinear rank, HOOI vs HOSVD, energy
ranks, the randomized range finder, re-ranking in the factors' span. Reconstructions are checked
with an explicit einsum (tests/helpers.py), not the library's own mode products."""

from __future__ import annotations

import pytest
import torch
from helpers import einsum_reconstruct, rel_error

from flora_kernels.decompose import exact_ranks, leading_subspace, tucker_decompose, tucker_rerank

CASES = [
    ((7, 5), (3, 2)),
    ((6, 5, 4), (3, 2, 2)),
    ((5, 4, 3, 3), (2, 3, 2, 2)),
    ((4, 3, 3, 2, 3), (2, 2, 3, 2, 1)),
]
IDS = [f"N{len(c[0])}" for c in CASES]


def low_rank(shape, ranks, dtype=torch.float64, gen=None):
    core = torch.randn(ranks, dtype=dtype, generator=gen)
    return einsum_reconstruct(core, [torch.randn(i, r, dtype=dtype, generator=gen) for i, r in zip(shape, ranks)])


def check_form(core, factors, shape, ranks):
    assert tuple(core.shape) == tuple(ranks)
    for n, f in enumerate(factors):
        assert tuple(f.shape) == (shape[n], ranks[n])
        torch.testing.assert_close(f.T @ f, torch.eye(ranks[n], dtype=f.dtype), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["hooi", "hosvd"])
@pytest.mark.parametrize("shape,ranks", CASES, ids=IDS)
def test_exact_at_true_multilinear_rank(shape, ranks, method):
    t = low_rank(shape, ranks)
    core, factors = tucker_decompose(t, ranks, method)
    check_form(core, factors, shape, ranks)
    assert core.dtype == torch.float64
    assert rel_error(einsum_reconstruct(core, factors), t) < 1e-12


@pytest.mark.parametrize("shape,ranks", CASES, ids=IDS)
def test_exact_float32_input(shape, ranks):
    t = low_rank(shape, ranks).float()
    core, factors = tucker_decompose(t, ranks)
    assert core.dtype == torch.float32
    assert rel_error(einsum_reconstruct(core, factors), t) < 1e-5


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape,ranks", CASES[1:], ids=IDS[1:])
def test_hooi_never_worse_than_hosvd(shape, ranks, seed):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, dtype=torch.float64, generator=gen)  # full multilinear rank: truncation errs
    errs = {}
    for method in ("hosvd", "hooi"):
        core, factors = tucker_decompose(t, ranks, method)
        check_form(core, factors, shape, ranks)
        errs[method] = rel_error(einsum_reconstruct(core, factors), t)
    assert 0 < errs["hooi"] <= errs["hosvd"] * (1 + 1e-12), errs


def test_hooi_improves_on_hosvd_and_hosvd_is_svd_for_matrices():
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(8, 7, 6, dtype=torch.float64, generator=gen)
    e = {m: rel_error(einsum_reconstruct(*tucker_decompose(t, (2, 2, 2), m)), t) for m in ("hosvd", "hooi")}
    assert e["hooi"] < e["hosvd"] - 1e-6, e  # strictly better on a generic 3-mode tensor
    m = torch.randn(9, 6, dtype=torch.float64, generator=gen)
    core, factors = tucker_decompose(m, (3, 3), "hosvd")
    u, s, vh = torch.linalg.svd(m)
    best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    torch.testing.assert_close(einsum_reconstruct(core, factors), best)  # Eckart-Young


def test_randomized_range_finder_exact_and_close():
    gen = torch.Generator().manual_seed(1)
    t = low_rank((300, 260), (5, 5), gen=gen)
    u, s = leading_subspace(t, 5, randomized=True)
    assert s.shape == (15,)  # r + oversample values seen
    assert rel_error(u @ (u.T @ t), t) < 1e-12
    noisy = t + 1e-3 * torch.randn(300, 260, dtype=torch.float64, generator=gen)
    exact = tucker_decompose(noisy, (5, 5), "hosvd", randomized=False)
    rand = tucker_decompose(noisy, (5, 5), "hosvd", randomized=True)
    e_exact, e_rand = (rel_error(einsum_reconstruct(*d), noisy) for d in (exact, rand))
    assert e_rand <= e_exact * 1.001


def test_ranks_above_the_other_modes_complete_the_basis():
    t = low_rank((6, 2, 2), (4, 2, 2))
    core, factors = tucker_decompose(t, (5, 2, 2))  # 5 > 2 * 2: one direction is unused
    check_form(core, factors, (6, 2, 2), (5, 2, 2))
    assert rel_error(einsum_reconstruct(core, factors), t) < 1e-12


def test_energy_picks_smallest_rank_per_mode():
    u, _ = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(8, 4, dtype=torch.float64))
    s = torch.tensor([10.0, 3.0, 1.0, 0.1], dtype=torch.float64)
    t = u @ torch.diag(s) @ v.T
    frac = torch.cumsum(s**2, 0) / (s**2).sum()  # 0.90900, 0.99082, 0.99991, 1
    for energy, r in [(0.9, 1), (0.95, 2), (0.99, 2), (0.995, 3), (0.9999, 3), (1.0, 4)]:
        core, _ = tucker_decompose(t, (8, 8), energy=energy)
        assert tuple(core.shape) == (r, r), (energy, float(frac[r - 1]))
        kept = float(core.square().sum() / t.square().sum())
        assert kept >= energy - 1e-9
    core, _ = tucker_decompose(t, (2, 3), energy=0.999)  # capped by ranks
    assert tuple(core.shape) == (2, 3)


@pytest.mark.parametrize("shape,ranks", CASES, ids=IDS)
def test_rerank_in_the_factors_span(shape, ranks):
    gen = torch.Generator().manual_seed(2)
    # Non-orthonormal factors, some with more columns than rows (r_n > I_n).
    big = tuple(r + 3 for r in ranks)
    core = torch.randn(big, dtype=torch.float64, generator=gen)
    factors = [torch.randn(i, r, dtype=torch.float64, generator=gen) for i, r in zip(shape, big)]
    dense = einsum_reconstruct(core, factors)
    c, fs = tucker_rerank(core, factors)  # exact bound
    assert tuple(c.shape) == exact_ranks(shape)
    assert rel_error(einsum_reconstruct(c, fs), dense) < 1e-12
    c2, fs2 = tucker_rerank(core, factors, ranks, method="hosvd")
    check_form(c2, fs2, shape, ranks)
    ref = tucker_decompose(dense, ranks, "hosvd", randomized=False)
    # The same truncated HOSVD as on the dense tensor (the span is exact, only the basis differs).
    assert rel_error(einsum_reconstruct(c2, fs2), einsum_reconstruct(*ref)) < 1e-8


def test_exact_ranks():
    assert exact_ranks((3, 768)) == (3, 3)
    assert exact_ranks((64, 3, 3, 3)) == (27, 3, 3, 3)
    assert exact_ranks((8, 512, 1, 1)) == (8, 8, 1, 1)


@pytest.mark.parametrize(
    "args,kwargs,err,match",
    [
        ((torch.randn(4, 5), (2, 6)), {}, ValueError, r"ranks\[1\]: expected an int in \[1, 5\]"),
        ((torch.randn(4, 5), (2,)), {}, ValueError, r"expected 2 ranks for a tensor of shape \(4, 5\), got \(2,\)"),
        ((torch.randn(4), (2,)), {}, ValueError, r"expected 2 to 5 modes, got shape \(4,\)"),
        ((torch.ones(4, 5, dtype=torch.long), (2, 2)), {}, TypeError, "floating-point tensor, got torch.int64"),
        ((torch.randn(4, 5), (2, 2)), {"method": "cp"}, ValueError, r"method: expected one of \('hooi', 'hosvd'\)"),
        ((torch.randn(4, 5), (2, 2)), {"energy": 1.5}, ValueError, r"energy: expected a fraction in \(0, 1\]"),
    ],
)
def test_errors(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        tucker_decompose(*args, **kwargs)


def test_ranks_accept_integer_likes_and_refuse_others():
    t = low_rank((5, 4), (2, 2))
    core, _ = tucker_decompose(t, torch.Size([2, 2]))
    assert tuple(core.shape) == (2, 2)
    for bad in [(2.0, 2), (True, 2), (0, 2)]:
        with pytest.raises(ValueError, match=r"ranks\[0\]: expected an int in \[1, 5\]"):
            tucker_decompose(t, bad)

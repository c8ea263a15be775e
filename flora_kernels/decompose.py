"""Tucker decomposition of dense tensors and re-ranking of Tucker tensors, in this library's conventions.

``tucker_decompose(t, ranks)`` returns ``(core, factors)`` with ``core.shape == ranks``,
``factors[n].shape == (t.shape[n], ranks[n])`` (orthonormal columns) and
``t ~= tucker_reconstruct(core, factors)``:

- ``method="hosvd"``: truncated HOSVD, ``U_n`` = the leading left singular vectors of the mode-n
  unfolding ``t_(n)`` (I_n, prod of the other sizes), ``core = t x_n U_n^T``.
- ``method="hooi"``: higher-order orthogonal iteration from the HOSVD: each sweep sets ``U_n``
  to the leading left singular vectors of ``(t x_{m != n} U_m^T)_(n)``. Every update maximizes
  ``||core||`` given the other factors and ``||t - t_hat||^2 = ||t||^2 - ||core||^2``, so the
  error never grows; a sweep whose error would (rounding) is discarded, the error being computed
  explicitly near exact fits.

Both are exact when ``t`` has multilinear rank at most ``ranks``. Modes whose unfolding is large
against the rank use a randomized range finder (Gaussian sketch of ``ranks[n] + oversample``
columns, ``power_iter`` subspace iterations, seeded: results are deterministic); it is exact
too at rank at most ``ranks[n]``.

``tucker_rerank(core, factors, ranks)`` re-decomposes a Tucker tensor whose factors need not be
orthonormal (or may have more columns than rows) without forming the full tensor: with
``U_n = Q_n R_n`` (reduced QR), ``core x_n U_n = (core x_n R_n) x_n Q_n``, and the small
tensor ``core x_n R_n`` (min(I_n, r_n) per mode) is decomposed instead.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from .tucker import MAX_MODES, MIN_MODES, check_tucker, mode_n_product, tucker_reconstruct

METHODS = ("hooi", "hosvd")


def exact_ranks(shape: Sequence[int]) -> tuple[int, ...]:
    """The largest useful ranks of a tensor of ``shape``: r_n = min(I_n, prod_{m != n} I_m).

    Every tensor of that shape has multilinear rank at most these, so a decomposition at these
    ranks is exact.
    """
    total = math.prod(shape)
    return tuple(min(int(i), total // int(i)) if i else 0 for i in shape)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _unfold(t: Tensor, n: int) -> Tensor:
    """Mode-n unfolding: (I_n, prod of the other sizes)."""
    return torch.movedim(t, n, 0).reshape(t.shape[n], -1)


def _complete(u: Tensor, r: int, generator: torch.Generator) -> Tensor:
    """``u`` (I, k) with orthonormal columns extended to r <= I orthonormal columns."""
    k = u.shape[1]
    if k >= r:
        return u[:, :r]
    extra = torch.randn(u.shape[0], r - k, dtype=u.dtype, device=u.device, generator=generator)
    extra = extra - u @ (u.transpose(0, 1) @ extra)
    q, _ = torch.linalg.qr(torch.cat([u, extra], dim=1))
    return torch.cat([u, q[:, k:]], dim=1)


def leading_subspace(
    m: Tensor, r: int, *, randomized: bool | None = None, oversample: int = 10, power_iter: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The leading ``r`` left singular vectors of ``m`` (I, J), and its leading singular values.

    Returns ``(U (I, r) orthonormal, s)`` where ``s`` holds the singular values the method saw,
    in decreasing order (all min(I, J) of them for a full SVD, ``r + oversample`` for the
    randomized one). ``r`` may exceed min(I, J) (up to I): the basis is completed orthonormally.
    ``randomized=None`` picks the range finder when ``4 * (r + oversample) <= min(I, J)``.
    """
    i, j = m.shape
    if not 0 <= r <= i:
        raise ValueError(f"rank: expected 0 <= r <= {i} (the rows of the {tuple(m.shape)} unfolding), got {r}")
    if generator is None:
        generator = torch.Generator(device=m.device).manual_seed(0)
    l = r + oversample
    if randomized is None:
        randomized = 4 * l <= min(i, j)
    if randomized and l < min(i, j):
        y = m @ torch.randn(j, l, dtype=m.dtype, device=m.device, generator=generator)
        for _ in range(power_iter):
            q, _ = torch.linalg.qr(y)
            z, _ = torch.linalg.qr(m.transpose(0, 1) @ q)
            y = m @ z
        q, _ = torch.linalg.qr(y)
        ub, s, _ = torch.linalg.svd(q.transpose(0, 1) @ m, full_matrices=False)
        return q @ ub[:, :r], s
    if j > 4 * i:  # wide (e.g. a kernel mode): m = R^T Q^T with m^T = Q R, so U = the SVD of R^T (I, I)
        _, rt = torch.linalg.qr(m.transpose(0, 1))
        m = rt.transpose(0, 1)
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    return _complete(u, r, generator), s


def _energy_rank(s: Tensor, total: float, energy: float, cap: int) -> int:
    """Smallest r <= cap whose leading squared singular values reach ``energy * total``, up to
    the rounding of ``s``'s dtype (so ``energy=1`` drops directions at rounding level)."""
    if total == 0.0:
        return min(cap, 1)
    kept = torch.cumsum(s.double() ** 2, 0)
    slack = 100 * torch.finfo(s.dtype).eps
    reach = torch.nonzero(kept >= (energy - slack) * total)
    r = int(reach[0]) + 1 if len(reach) else cap
    return max(1, min(r, cap))


def _check_ranks(shape: tuple[int, ...], ranks: Sequence[int]) -> tuple[int, ...]:
    if len(ranks) != len(shape):
        raise ValueError(f"ranks: expected {len(shape)} ranks for a tensor of shape {shape}, got {tuple(ranks)}")
    out = []
    for n, (r, i) in enumerate(zip(ranks, shape)):
        try:
            v = operator.index(r) if not isinstance(r, bool) else None
        except TypeError:
            v = None
        if v is None or not 1 <= v <= i:
            raise ValueError(f"ranks[{n}]: expected an int in [1, {i}] (mode {n} of shape {shape}), got {r!r}")
        out.append(v)
    return tuple(out)


def _partial_project(t: Tensor, factors: Sequence[Tensor], skip: int) -> Tensor:
    """``t x_m U_m^T`` for every mode m except ``skip``, shrinking the largest modes first."""
    order = sorted((m for m in range(t.dim()) if m != skip), key=lambda m: factors[m].shape[1] / t.shape[m])
    for m in order:
        t = mode_n_product(t, factors[m].transpose(0, 1), m)
    return t


def _project(t: Tensor, factors: Sequence[Tensor]) -> Tensor:
    return _partial_project(t, factors, -1)


def _sq_norm(t: Tensor) -> float:
    return float(torch.linalg.vector_norm(t)) ** 2


def _residual(t: Tensor, core: Tensor, factors: Sequence[Tensor], total: float) -> float:
    """||t - core x_n U_n||^2 for orthonormal factors: ``total - ||core||^2`` (``total`` = ||t||^2)
    while that keeps 3 digits in ``t``'s precision, else computed explicitly (the identity loses
    all precision for near-exact fits)."""
    err = total - _sq_norm(core)
    if err > 1e4 * torch.finfo(t.dtype).eps * total:
        return err
    return _sq_norm(t - tucker_reconstruct(core, factors))


def tucker_decompose(
    t: Tensor,
    ranks: Sequence[int],
    method: str = "hooi",
    n_iter: int = 10,
    tol: float = 1e-3,
    *,
    energy: float | None = None,
    randomized: bool | None = None,
    oversample: int = 10,
    power_iter: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Tucker decomposition ``t ~= core x_0 U_0 ... x_{N-1} U_{N-1}`` (see the module docstring).

    Args:
        t: (I_0, ..., I_{N-1}), N from 2 to 5, floating point.
        ranks: (r_0, ..., r_{N-1}), 1 <= r_n <= I_n; with ``energy``, the largest ranks allowed.
        method: "hooi" (from an HOSVD start) or "hosvd".
        n_iter: the most HOOI sweeps.
        tol: HOOI stops when a sweep lowers ``||t - t_hat||^2`` by less than this fraction.
        energy: in (0, 1]: per mode, the smallest rank whose leading singular values of the
            unfolding keep this fraction of ``||t||^2`` (capped by ``ranks``).
        randomized: force (True) or forbid (False) the randomized range finder; None decides per
            mode. oversample, power_iter, generator: its parameters (default seed 0).

    Returns:
        ``(core, factors)``: core (ranks), factors[n] (I_n, r_n) with orthonormal columns, in
        float64 for a float64 ``t``, float32 otherwise.
    """
    if not isinstance(t, Tensor) or not t.is_floating_point():
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"t: expected a floating-point tensor, got {got}")
    if not MIN_MODES <= t.dim() <= MAX_MODES:
        raise ValueError(f"t: expected {MIN_MODES} to {MAX_MODES} modes, got shape {tuple(t.shape)}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy: expected a fraction in (0, 1], got {energy!r}")
    shape = tuple(t.shape)
    ranks = list(_check_ranks(shape, ranks))
    t = t.detach().to(_compute_dtype(t))
    if generator is None:
        generator = torch.Generator(device=t.device).manual_seed(0)
    total = _sq_norm(t)
    kw = {"randomized": randomized, "oversample": oversample, "power_iter": power_iter, "generator": generator}

    factors = []
    for n in range(t.dim()):
        u, s = leading_subspace(_unfold(t, n), ranks[n], **kw)
        if energy is not None:
            ranks[n] = _energy_rank(s, total, energy, ranks[n])
            u = u[:, : ranks[n]]
        factors.append(u)
    core = _project(t, factors)
    if method == "hosvd" or total == 0.0:
        return core, factors

    err = _residual(t, core, factors, total)
    last = t.dim() - 1
    for _ in range(n_iter):
        new = list(factors)
        for n in range(t.dim()):
            y = _partial_project(t, new, n)
            new[n], _ = leading_subspace(_unfold(y, n), ranks[n], **kw)
        new_core = mode_n_product(y, new[last].transpose(0, 1), last)  # y: all modes but the last projected
        new_err = _residual(t, new_core, new, total)
        if new_err > err:  # rounding: never return a worse fit than the previous sweep
            break
        gain = (err - new_err) / err if err > 0 else 0.0
        factors, core, err = new, new_core, new_err
        if gain < tol:
            break
    return core, factors


def tucker_rerank(
    core: Tensor,
    factors: Sequence[Tensor],
    ranks: Sequence[int] | None = None,
    method: str = "hooi",
    **kwargs,
) -> tuple[Tensor, list[Tensor]]:
    """Re-decompose ``core x_n U_n`` at new ranks, working in the factors' span (no full tensor).

    Args:
        core: (r_0, ..., r_{N-1}); factors[n]: (I_n, r_n), any columns (r_n may exceed I_n).
        ranks: new ranks, each clamped to what the span allows (min(I_n, r_n) and the exact
            bound of ``exact_ranks``); None for those bounds, which is exact.
        method, kwargs: as for ``tucker_decompose`` (``energy`` included).

    Returns:
        ``(core', factors')`` with orthonormal factors; ``core' x_n U'_n`` equals the input up to
        rounding whenever ``ranks`` is at least its multilinear rank.
    """
    check_tucker(core, factors)
    dt = torch.promote_types(_compute_dtype(core), _compute_dtype(factors[0]))
    small, qs = core.detach().to(dt), []
    for n, f in enumerate(factors):
        f = f.detach().to(dt)
        if f.shape[0] <= f.shape[1]:  # Q = I: the mode keeps its full size I_n
            small, q = mode_n_product(small, f, n), None
        else:
            q, r = torch.linalg.qr(f)
            small = mode_n_product(small, r, n)
        qs.append(q)
    bound = exact_ranks(small.shape)
    target = bound if ranks is None else tuple(min(int(r), b) for r, b in zip(ranks, bound, strict=True))
    new_core, vs = tucker_decompose(small, target, method, **kwargs)
    return new_core, [v if q is None else q @ v for q, v in zip(qs, vs)]


__all__ = ["METHODS", "exact_ranks", "leading_subspace", "tucker_decompose", "tucker_rerank"]

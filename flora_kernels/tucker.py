"""Tucker algebra for FLoRA: mode-n products, reconstruct and its adjoint, init.

Conventions (docs/ARCHITECTURE.md, Conventions): for an N-mode weight of shape (I_0, ..., I_{N-1}),
``core`` has shape ``ranks = (r_0, ..., r_{N-1})`` and ``factors[n]`` has shape
``(I_n, r_n)``. ``tucker_reconstruct`` returns ``scale * core x_0 U_0 ... x_{N-1} U_{N-1}``
(shape ``(I_0, ..., I_{N-1})``); ``tucker_project`` is its adjoint,
``t x_0 U_0^T ... x_{N-1} U_{N-1}^T`` (shape ``ranks``).

Everything here is plain differentiable PyTorch: it is the reference the kernels are
tested against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

MIN_MODES = 2
MAX_MODES = 5


def mode_n_product(t: Tensor, m: Tensor, n: int) -> Tensor:
    """``t x_n m``: contract dim ``n`` of ``t`` (size ``m.shape[1]``) with ``m`` (J, r).

    The result has dim ``n`` of size J and every other dim unchanged. It is computed in
    ``t``'s dtype, autocast or not (the adapter's math stays in its own dtype). The first and
    the last two modes are one matmul each; the others a tensordot and a move of the new dim.
    """
    if torch._C._is_any_autocast_enabled():
        with torch.autocast(t.device.type, enabled=False):
            return _mode_n_product(t, m.to(t.dtype), n)
    return _mode_n_product(t, m.to(t.dtype), n)


def _mode_n_product(t: Tensor, m: Tensor, n: int) -> Tensor:
    if n == t.dim() - 1:
        return t @ m.t()
    if n == t.dim() - 2:
        return m @ t
    if n == 0:
        return (m @ t.reshape(t.shape[0], -1)).reshape(m.shape[0], *t.shape[1:])
    return torch.movedim(torch.tensordot(t, m, dims=([n], [1])), -1, n)


def contraction_order(sizes_from: Sequence[int], sizes_to: Sequence[int]) -> tuple[int, ...]:
    """Cheapest order of mode products turning a tensor of ``sizes_from`` into ``sizes_to``.

    Applying mode n to a tensor of current size S costs S * to[n] multiply-adds. Swapping two
    adjacent steps a, b changes only their own two terms (the size after both is the same), and
    a before b is no worse iff 1/from[a] - 1/to[a] <= 1/from[b] - 1/to[b]. That is a key, so
    sorting by it is optimal (exchange argument) and cheap enough for torch.compile to trace.
    """
    return tuple(sorted(range(len(sizes_from)), key=lambda n: 1.0 / sizes_from[n] - 1.0 / sizes_to[n]))


def check_tucker(core: Tensor, factors: Sequence[Tensor], what: str = "core") -> None:
    """Raise ``ValueError`` unless ``core`` and ``factors`` form a valid Tucker pair."""
    if not isinstance(core, Tensor):
        raise TypeError(f"{what}: expected a Tensor, got {type(core).__name__}")
    n = core.dim()
    if not MIN_MODES <= n <= MAX_MODES:
        raise ValueError(
            f"{what}: expected {MIN_MODES} to {MAX_MODES} modes, got a {n}-D tensor of shape "
            f"{tuple(core.shape)}"
        )
    if len(factors) != n:
        raise ValueError(
            f"expected one factor per mode of the {what} ({n} for shape {tuple(core.shape)}), "
            f"got {len(factors)}"
        )
    for i, f in enumerate(factors):
        if not isinstance(f, Tensor) or f.dim() != 2 or f.shape[1] != core.shape[i]:
            got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(
                f"factors[{i}]: expected shape (I_{i}, {core.shape[i]}) to match mode {i} of the "
                f"{what} of shape {tuple(core.shape)}, got {got}"
            )


def check_projection(t: Tensor, factors: Sequence[Tensor]) -> tuple[int, ...]:
    """Raise ``ValueError`` unless ``factors`` can project ``t``; return the ranks."""
    if not isinstance(t, Tensor):
        raise TypeError(f"t: expected a Tensor, got {type(t).__name__}")
    if not MIN_MODES <= t.dim() <= MAX_MODES or t.dim() != len(factors):
        raise ValueError(
            f"t: expected {MIN_MODES} to {MAX_MODES} modes and one factor per mode, got shape "
            f"{tuple(t.shape)} and {len(factors)} factors"
        )
    ranks = []
    for i, f in enumerate(factors):
        if not isinstance(f, Tensor) or f.dim() != 2 or f.shape[0] != t.shape[i]:
            got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(
                f"factors[{i}]: expected shape ({t.shape[i]}, r_{i}) to match mode {i} of t of shape "
                f"{tuple(t.shape)}, got {got}"
            )
        ranks.append(f.shape[1])
    return tuple(ranks)


def tucker_reconstruct(
    core: Tensor, factors: Sequence[Tensor], scale: float = 1.0, base: Tensor | None = None
) -> Tensor:
    """``base + scale * core x_0 U_0 ... x_{N-1} U_{N-1}``.

    Args:
        core: (r_0, ..., r_{N-1}).
        factors: N tensors, ``factors[n]`` of shape (I_n, r_n).
        scale: s.
        base: optional (I_0, ..., I_{N-1}); the sum is returned in ``base.dtype``.

    Returns:
        (I_0, ..., I_{N-1}) in the core's dtype, or ``base.dtype`` when ``base`` is given.
    """
    check_tucker(core, factors)
    out_shape = tuple(f.shape[0] for f in factors)
    if base is not None and tuple(base.shape) != out_shape:
        raise ValueError(f"base: expected shape {out_shape} (from the factors), got {tuple(base.shape)}")
    t = core
    for n in contraction_order(tuple(core.shape), out_shape):
        t = mode_n_product(t, factors[n], n)
    if scale != 1.0:
        t = t * scale
    if base is None:
        return t
    return base + t.to(base.dtype)


def core_kernel(core: Tensor, factors: Sequence[Tensor], scale: float = 1.0) -> Tensor:
    """The core folded with the kernel-mode factors, ``K = scale * core x_2 U_2 ... x_{N-1} U_{N-1}``:
    (r_0, r_1, I_2, ..., I_{N-1}) (the core conv's kernel; the core itself for N = 2). Differentiable,
    tiny; every backend's conv and reconstruct use this one fold."""
    k = core
    for n in range(2, core.dim()):
        k = mode_n_product(k, factors[n], n)
    return k * scale if scale != 1.0 else k


def input_fold(core: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """The core folded with every factor but the output one, ``A = core x_1 U_1 ... x_{N-1} U_{N-1}``:
    (r_0, I_1, ..., I_{N-1}), the kernel of a conv from the input channels to r_0 (LoRA's A for
    a conv). At most two GEMMs whatever N: U_1 against the core's mode-1 unfolding, then (N > 2)
    the Kronecker product of the kernel-mode factors against the kernel modes. Differentiable;
    few autograd nodes (it runs on every training call). ``factors[0]`` is not read. The result
    is a transposed view."""
    r0, r1 = core.shape[0], core.shape[1]
    t = factors[1] @ core.transpose(0, 1).reshape(r1, -1)  # (I_1, r_0 * prod(r_k))
    if core.dim() > 2:
        kk = factors[2]
        for f in factors[3:]:
            kk = torch.kron(kk, f)  # (prod I_k, prod r_k)
        t = t.view(-1, kk.shape[1]) @ kk.t()  # (I_1 r_0, prod I_k)
    return t.view(factors[1].shape[0], r0, *(f.shape[0] for f in factors[2:])).transpose(0, 1)


def tucker_project(t: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """Adjoint of reconstruct: ``t x_0 U_0^T ... x_{N-1} U_{N-1}^T``.

    Args:
        t: (I_0, ..., I_{N-1}).
        factors: N tensors, ``factors[n]`` of shape (I_n, r_n).

    Returns:
        (r_0, ..., r_{N-1}).
    """
    ranks = check_projection(t, factors)
    for n in contraction_order(tuple(t.shape), tuple(ranks)):
        t = mode_n_product(t, factors[n].transpose(0, 1), n)
    return t


def clamp_ranks(weight_shape: Sequence[int], ranks: Sequence[int]) -> tuple[int, ...]:
    """Clamp each rank to its mode size (docs/ARCHITECTURE.md, Conventions)."""
    return tuple(min(int(r), int(i)) for r, i in zip(ranks, weight_shape, strict=True))


@torch.no_grad()
def init_tucker_(core: Tensor, factors: Sequence[Tensor], generator: torch.Generator | None = None) -> None:
    """The paper's init, in place: core = 0; factors[n] ~ N(0, 1 / (2 r_n)).

    This is kaiming-normal with a = sqrt(3) and fan_in = r_n, so dW = 0 at step 0.
    """
    core.zero_()
    for f in factors:
        f.normal_(0.0, 1.0 / math.sqrt(2 * f.shape[1]), generator=generator)

"""Shared test helpers: einsum oracles, layer factories; the tolerances and ``assert_close`` are
``flora_kernels.testing``'s (re-exported here).

Nothing here uses flora_kernels' own reconstruct or conv paths: the oracles are written from
the definitions in docs/ARCHITECTURE.md, Conventions with ``torch.einsum`` and plain ``torch.nn`` modules.
"""

from __future__ import annotations

import copy
import string
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flora_kernels.testing import ELEMENTWISE as TOL  # noqa: F401 (re-exported for the tests)
from flora_kernels.testing import assert_close  # noqa: F401
from flora_kernels.testing import rel_err as rel_error


def assert_rel_close(actual: Tensor, expected: Tensor, tol: float, msg: str = "") -> None:
    """Norm-relative error below ``tol`` (robust for sums with cancellation)."""
    err = rel_error(actual, expected)
    assert err < tol, f"{msg}: norm-rel err {err:.3e} >= {tol:g}"


# --- oracles from the definitions -------------------------------------------------------------


def einsum_reconstruct(core: Tensor, factors: Sequence[Tensor], scale: float = 1.0) -> Tensor:
    """scale * core x_0 U_0 ... x_{N-1} U_{N-1} as one einsum (U_n: (I_n, r_n))."""
    n = core.dim()
    r, i = string.ascii_lowercase[:n], string.ascii_uppercase[:n]
    spec = r + "," + ",".join(i[k] + r[k] for k in range(n)) + "->" + i
    return scale * torch.einsum(spec, core, *factors)


def einsum_project(t: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """t x_0 U_0^T ... x_{N-1} U_{N-1}^T as one einsum."""
    n = t.dim()
    r, i = string.ascii_lowercase[:n], string.ascii_uppercase[:n]
    spec = i + "," + ",".join(i[k] + r[k] for k in range(n)) + "->" + r
    return torch.einsum(spec, t, *factors)


def module_with_weight(base: nn.Module, weight: Tensor, bias: bool = False) -> nn.Module:
    """A deep copy of ``base`` whose weight is ``weight`` (and bias dropped unless ``bias``).

    Running it is an independent oracle for ``op(x, weight)`` with the base's own geometry,
    padding mode included (torch's own nn module code, not flora_kernels.convspec).
    """
    m = copy.deepcopy(base)
    with torch.no_grad():
        m.weight = nn.Parameter(weight.detach().clone().to(m.weight.dtype))
        if not bias and getattr(m, "bias", None) is not None:
            m.bias = None
    return m


def oracle_output(base: nn.Module, x: Tensor, core: Tensor, factors: Sequence[Tensor], scale: float) -> Tensor:
    """base(x) + op(x, dW) in fp64, dW from einsum, op run by a torch module clone.

    ``base`` is not modified (an fp64 deep copy runs).
    """
    b = copy.deepcopy(base).double()
    dw = einsum_reconstruct(core.detach().double(), [f.detach().double() for f in factors], scale)
    xd = x.detach().double()
    return b(xd) + module_with_weight(b, dw)(xd)


def randomize_(layer: nn.Module, gen: torch.Generator | None = None) -> nn.Module:
    """Give a FLoRA layer a random core (never the zero init) and random factors."""
    with torch.no_grad():
        layer.core.copy_(torch.randn(layer.core.shape, generator=gen, dtype=layer.core.dtype))
        for f in layer.factors:
            f.copy_(torch.randn(f.shape, generator=gen, dtype=f.dtype) / f.shape[1] ** 0.5)
    return layer


CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv_input(base: nn.Module, batch: int = 2, size: int = 7, dtype: torch.dtype = torch.float32) -> Tensor:
    """A random (batch, C_in, size, ...) input for a conv module."""
    d = base.weight.dim() - 2
    return torch.randn(batch, base.in_channels, *([size] * d), dtype=dtype)


def ref_linear(x: Tensor, w: Tensor) -> Tensor:
    """x W^T without bias (oracle helper)."""
    return F.linear(x, w)


# --- conv configurations shared by the reference and layer tests ------------------------------
# (id, dims, in, out, kernel, kwargs for nn.ConvNd, rank, kernel_rank)
CONV_CASES: list[tuple[str, int, int, int, object, dict, object, object]] = [
    ("1d-pad1-bias", 1, 5, 6, 3, dict(padding=1), 2, None),
    ("1d-s2-d2-reflect-nobias", 1, 4, 7, 3,
     dict(stride=2, padding=2, dilation=2, padding_mode="reflect", bias=False), (3, 2), 2),
    ("2d-pad1", 2, 5, 6, 3, dict(padding=1), 3, None),
    ("2d-groups2-tuples", 2, 6, 4, (3, 2),
     dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2), (2, 3), (2, 1)),
    ("2d-depthwise-same", 2, 6, 6, 3, dict(padding="same", groups=6), 1, None),
    ("2d-groups3-mult2-nobias", 2, 3, 6, 3, dict(padding=1, groups=3, bias=False), (2, 1), 2),
    ("2d-same-even-kernel", 2, 3, 5, (4, 3), dict(padding="same", dilation=(1, 2)), 2, (3, 2)),
    ("2d-valid", 2, 3, 5, 3, dict(padding="valid"), 2, None),
    ("2d-reflect", 2, 4, 5, 3, dict(padding=(2, 1), padding_mode="reflect"), 3, 2),
    ("2d-replicate", 2, 4, 5, 3, dict(padding=1, padding_mode="replicate"), 3, None),
    ("2d-circular", 2, 4, 5, 3, dict(padding=(1, 2), padding_mode="circular"), 3, None),
    ("2d-same-reflect", 2, 3, 4, 3, dict(padding="same", padding_mode="reflect"), 2, None),
    ("2d-rank1", 2, 5, 7, 3, dict(padding=1), 1, 1),
    ("2d-1x1-s2", 2, 6, 5, 1, dict(stride=2), 3, None),
    ("3d-s121", 3, 3, 4, (3, 2, 3), dict(padding=1, stride=(1, 2, 1)), 2, None),
    ("3d-groups2-circular", 3, 4, 6, 3, dict(padding=1, groups=2, padding_mode="circular"), (3, 2), (2, 1, 3)),
]
CONV_IDS = [c[0] for c in CONV_CASES]


def make_conv(case) -> tuple[nn.Module, object, object]:
    """(base nn.ConvNd, rank, kernel_rank) for a ``CONV_CASES`` row."""
    _, d, cin, cout, k, kw, rank, krank = case
    return CONV[d](cin, cout, k, **kw), rank, krank


def conv_size(d: int) -> int:
    """Spatial input size per dim for d-D cases (small, odd)."""
    return {1: 11, 2: 9, 3: 6}[d]

"""Public functional API: validate at the boundary, describe the call, dispatch.

Two levels: the public functions (``flora_linear``, ``flora_conv``, ...) validate their
arguments ("expected X, got Y"), then call the internal, unvalidated entries ``linear`` /
``conv``, which layers call directly with arguments they prepared and checked when their
adapters changed. A layer that binds a call per input signature splits it further:
``decide_linear`` / ``decide_conv`` (describe + dispatch, once per signature) and
``run_linear`` / ``run_conv`` (the op, every call).

Each function builds a ``Call`` (the typed description of the call: op, shapes, dtypes,
layout, grad flags, ...) and asks ``backends.autotune.resolve`` which (backend, strategy)
serves it; the merged strategy is composed over the backend's reconstruct
(``backends.merged``). A new op plugs in by building its ``Call`` and calling
``resolve(call, backend)``: a backend without a method of the op's name does not serve it
(an explicit request raises ``BackendUnavailable`` saying so; "auto" falls back to the
backends that do, the reference last).

    fk.flora_linear(x, weight, bias, core, factors, scale, ...)   -> base(x) + x dW^T
    fk.flora_conv(x, weight, bias, core, factors, scale, ...)     -> base(x) + conv(x, dW)
    fk.tucker_reconstruct(core, factors, scale, base)             -> base + s * G x_n U_n
    fk.tucker_project(t, factors)                                 -> t x_n U_n^T

Every function is differentiable with respect to every tensor argument.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from torch import Tensor

from . import plan as _plan
from .backends import merged as _merged
from .backends.autotune import resolve
from .backends.base import STRATEGIES, Backend, Call, TensorSpec
from .convspec import ConvSpec, IntOrTuple
from .tucker import check_projection, check_tucker

STRATEGY_CHOICES = ("auto",) + STRATEGIES


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGY_CHOICES:
        raise ValueError(f"strategy: expected one of {STRATEGY_CHOICES}, got {strategy!r}")


def _check_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {p!r}")


def _check_tensors(named: dict[str, Tensor | None]) -> None:
    """All given tensors: floating point, one device."""
    devices = set()
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
        devices.add(t.device)
    if len(devices) > 1:
        raise ValueError(
            "expected every tensor on one device, got "
            + ", ".join(f"{n} on {t.device}" for n, t in named.items() if t is not None)
        )


def _check_adapter(weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor]) -> None:
    check_tucker(core, factors)
    if core.dim() != weight.dim():
        raise ValueError(
            f"core: expected {weight.dim()} modes to match the weight of shape {tuple(weight.shape)}, "
            f"got shape {tuple(core.shape)}"
        )
    for n, f in enumerate(factors):
        if f.shape[0] != weight.shape[n]:
            raise ValueError(
                f"factors[{n}]: expected shape ({weight.shape[n]}, {core.shape[n]}) for mode {n} of the "
                f"weight of shape {tuple(weight.shape)}, got {tuple(f.shape)}"
            )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def plan_linear_call(x: Tensor, weight: Tensor, core: Tensor, factors: Sequence[Tensor], dropout_p: float) -> _plan.Plan:
    """What the cost model picks for this linear call, with both costs."""
    return _plan.plan_call(Call.describe("linear", x=x, weight=weight, core=core, factors=factors, dropout_p=dropout_p))


def plan_conv_call(
    x: Tensor, weight: Tensor, core: Tensor, factors: Sequence[Tensor], spec: ConvSpec, dropout_p: float
) -> _plan.Plan:
    """What the cost model picks for this conv call (x batched), with both costs."""
    return _plan.plan_call(
        Call.describe("conv", x=x, weight=weight, core=core, factors=factors, conv=spec, dropout_p=dropout_p)
    )


def run_linear(
    b: Backend, strategy: str | None, x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor,
    factors: Sequence[Tensor], scale: float, dropout_p: float,
) -> Tensor:
    """The op ``decide_linear`` chose, unvalidated: x (..., in) -> (..., out)."""
    if strategy == "merged":
        return _merged.linear(b, x, weight, bias, core, factors, scale, dropout_p)
    return b.linear(x, weight, bias, core, factors, scale, dropout_p)  # type: ignore[attr-defined]


def run_conv(
    b: Backend, strategy: str | None, x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor,
    factors: Sequence[Tensor], scale: float, spec: ConvSpec, dropout_p: float,
) -> Tensor:
    """The op ``decide_conv`` chose, unvalidated: x (N, C_in, *spatial) batched -> (N, C_out, *out)."""
    if strategy == "merged":
        return _merged.conv(b, x, weight, bias, core, factors, scale, spec, dropout_p)
    return b.conv(x, weight, bias, core, factors, scale, spec, dropout_p)  # type: ignore[attr-defined]


def bind_conv(
    b: Backend, strategy: str | None, x: Tensor, weight: Tensor, core: Tensor, factors: Sequence[Tensor], scale: float,
    spec: ConvSpec, dropout_p: float,
) -> Callable[[Tensor, Tensor, Tensor | None, Tensor, Sequence[Tensor]], Tensor]:
    """``run_conv`` for every input of x's signature, as ``op(x, weight, bias, core, factors)`` (what
    a layer binds: the backend decides once what depends only on the signature, ``Backend.conv_op``)."""
    if strategy == "merged":
        return lambda x, w, bias, c, fs: _merged.conv(b, x, w, bias, c, fs, scale, spec, dropout_p)
    return b.conv_op(x, weight, core, factors, scale, spec, dropout_p)


def decide_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor], scale: float,
    dropout_p: float, strategy: str, backend: str,
) -> tuple[Backend, str | None]:
    """Which (backend, strategy) serves this linear call (unvalidated; measured dispatch may time the
    candidates on these tensors). The answer holds for every call with the same ``Call``."""
    call = Call.describe("linear", x=x, weight=weight, bias=bias, core=core, factors=factors, strategy=strategy,
                         dropout_p=dropout_p)

    def run(b: Backend, s: str | None, t: Sequence[Tensor | None], p: float) -> Tensor:
        xt, w, bt, c, *fs = t
        return run_linear(b, s, xt, w, bt, c, fs, scale, p)  # type: ignore[arg-type]

    return resolve(call, backend, run, (x, weight, bias, core, *factors), dropout_p)


def decide_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor], scale: float,
    spec: ConvSpec, dropout_p: float, strategy: str, backend: str,
) -> tuple[Backend, str | None]:
    """``decide_linear`` for a conv (x batched)."""
    call = Call.describe("conv", x=x, weight=weight, bias=bias, core=core, factors=factors, conv=spec,
                         strategy=strategy, dropout_p=dropout_p)

    def run(b: Backend, s: str | None, t: Sequence[Tensor | None], p: float) -> Tensor:
        xt, w, bt, c, *fs = t
        return run_conv(b, s, xt, w, bt, c, fs, scale, spec, p)  # type: ignore[arg-type]

    return resolve(call, backend, run, (x, weight, bias, core, *factors), dropout_p)


def decide_traced_call(
    op: str, x: TensorSpec, grad_enabled: bool, weight: Tensor, bias: Tensor | None, core: Tensor,
    factors: Sequence[Tensor], spec: ConvSpec | None, dropout_p: float, strategy: str, backend: str,
) -> tuple[Backend, str | None]:
    """``decide_linear`` / ``decide_conv`` from x's metadata alone (torch.compile's tracing: nothing
    is measured; see ``resolve``)."""
    call = Call.describe(op, weight=weight, bias=bias, core=core, factors=factors, conv=spec, strategy=strategy,
                         dropout_p=dropout_p)
    return resolve(replace(call, x=x, grad_enabled=grad_enabled), backend)


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor], scale: float,
    dropout_p: float, strategy: str, backend: str,
) -> Tensor:
    """``flora_linear`` without validation (arguments already checked by the caller)."""
    b, s = decide_linear(x, weight, bias, core, factors, scale, dropout_p, strategy, backend)
    return run_linear(b, s, x, weight, bias, core, factors, scale, dropout_p)


def conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor], scale: float,
    spec: ConvSpec, dropout_p: float, strategy: str, backend: str,
) -> Tensor:
    """``flora_conv`` without validation, x batched (N, C_in, *spatial)."""
    b, s = decide_conv(x, weight, bias, core, factors, scale, spec, dropout_p, strategy, backend)
    return run_conv(b, s, x, weight, bias, core, factors, scale, spec, dropout_p)


def flora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
    scale: float = 1.0, dropout_p: float = 0.0, strategy: str = "auto", backend: str = "auto",
) -> Tensor:
    """``x W^T + b + dropout(x) dW^T`` with ``dW = scale * core x_0 U_out x_1 U_in``.

    Args:
        x: (..., in).
        weight: (out, in), frozen base weight. bias: (out,) or None.
        core: (r_out, r_in). factors: [(out, r_out), (in, r_in)].
        dropout_p: adapter dropout probability, applied as given (pass 0 in eval mode).
        strategy: "factorized", "merged" or "auto" (measured per call signature, else the cost
            model; see ``flora_kernels.backends.autotune``).
        backend: "auto" or a registered backend ("reference", "triton", "cuda", "cpp").

    Returns:
        (..., out).
    """
    _check_tensors({"x": x, "weight": weight, "bias": bias, "core": core, **{f"factors[{i}]": f for i, f in enumerate(factors)}})
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D (out, in) tensor, got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected shape (..., {weight.shape[1]}), got {tuple(x.shape)}")
    _check_adapter(weight, bias, core, factors)
    _check_strategy(strategy)
    _check_dropout(dropout_p)
    return linear(x, weight, bias, core, factors, float(scale), float(dropout_p), strategy, backend)


def flora_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
    scale: float = 1.0, stride: IntOrTuple = 1, padding: IntOrTuple | str = 0, dilation: IntOrTuple = 1,
    groups: int = 1, padding_mode: str = "zeros", strategy: str = "auto", backend: str = "auto",
    dropout_p: float = 0.0,
) -> Tensor:
    """``convNd(x, W, b) + convNd(dropout(x), dW)``, both with the given geometry.

    Args:
        x: (N, C_in, *spatial) or unbatched (C_in, *spatial), d = 1, 2 or 3 spatial dims.
        weight: (C_out, C_in / groups, *kernel). bias: (C_out,) or None.
        core: (r_out, r_in, *kernel_ranks). factors: [(C_out, r_out), (C_in / groups, r_in),
            (k_1, rk_1), ...].
        stride, padding ('same', 'valid', int or per-dim), dilation, groups, padding_mode
            ('zeros', 'reflect', 'replicate', 'circular'): as in ``nn.ConvNd``.

    Returns:
        (N, C_out, *out_spatial), or unbatched likewise.
    """
    _check_tensors({"x": x, "weight": weight, "bias": bias, "core": core, **{f"factors[{i}]": f for i, f in enumerate(factors)}})
    d = weight.dim() - 2
    if d not in (1, 2, 3):
        raise ValueError(f"weight: expected (C_out, C_in/groups, *kernel) with 1 to 3 kernel dims, got shape {tuple(weight.shape)}")
    spec = ConvSpec.make(tuple(weight.shape[2:]), stride, padding, dilation, groups, padding_mode)
    unbatched = x.dim() == d + 1
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != d + 2 or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(
            f"x: expected shape (N, {weight.shape[1] * groups}, {d} spatial dims) or unbatched "
            f"({weight.shape[1] * groups}, {d} spatial dims) for weight {tuple(weight.shape)} and groups={groups}, "
            f"got {tuple(x.shape) if not unbatched else tuple(x.shape[1:])}"
        )
    if weight.shape[0] % groups:
        raise ValueError(f"weight: expected C_out divisible by groups={groups}, got {weight.shape[0]}")
    _check_adapter(weight, bias, core, factors)
    _check_strategy(strategy)
    _check_dropout(dropout_p)
    y = conv(x, weight, bias, core, factors, float(scale), spec, float(dropout_p), strategy, backend)
    return y.squeeze(0) if unbatched else y


def tucker_reconstruct(
    core: Tensor, factors: Sequence[Tensor], scale: float = 1.0, base: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """``base + scale * core x_0 U_0 ... x_{N-1} U_{N-1}``; see ``flora_kernels.tucker``.

    core: (r_0..r_{N-1}); factors[n]: (I_n, r_n); base: (I_0..I_{N-1}) or None. Returns
    (I_0..I_{N-1}) in ``base.dtype`` if given, else the core's dtype.
    """
    check_tucker(core, factors)
    _check_tensors({"core": core, "base": base, **{f"factors[{i}]": f for i, f in enumerate(factors)}})
    if base is not None:
        want = tuple(f.shape[0] for f in factors)
        if tuple(base.shape) != want:
            raise ValueError(f"base: expected shape {want} (from the factors), got {tuple(base.shape)}")
    b, _ = resolve(Call.describe("reconstruct", core=core, factors=factors, base=base), backend)
    return b.reconstruct(core, list(factors), float(scale), base)  # type: ignore[attr-defined]


def tucker_project(t: Tensor, factors: Sequence[Tensor], backend: str = "auto") -> Tensor:
    """``t x_0 U_0^T ... x_{N-1} U_{N-1}^T``: t (I_0..I_{N-1}) -> (r_0..r_{N-1})."""
    check_projection(t, factors)
    _check_tensors({"t": t, **{f"factors[{i}]": f for i, f in enumerate(factors)}})
    b, _ = resolve(Call.describe("project", x=t, factors=factors), backend)
    return b.project(t, list(factors))  # type: ignore[attr-defined]

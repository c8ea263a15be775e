"""The contract every backend implements, and the dispatcher that picks one per call.

A backend is a set of *differentiable* implementations of the FLoRA ops (each owns its
autograd), plus two questions the dispatcher asks before using it:

- ``unavailable_reason()``: why it cannot run on this machine at all (None if it can);
- ``unsupported_reason(op, tensors, strategy)``: why it cannot serve this call (None if it can).

``backend="auto"`` walks ``AUTO_ORDER`` and takes the first backend that answers None to both
and to ``auto_reason`` (a backend may serve explicit requests that auto should not pick, e.g.
Triton under the CPU interpreter). An explicit request for a backend that cannot serve the call
raises ``BackendUnavailable`` with its reason and how to get it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from torch import Tensor

from ..convspec import ConvSpec

OPS = ("reconstruct", "project", "linear", "conv")
STRATEGIES = ("factorized", "merged")
BACKEND_NAMES = ("reference", "triton", "cuda", "cpp")
# Fastest first: auto takes the first backend that can serve the call.
AUTO_ORDER = ("triton", "cuda", "cpp", "reference")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot serve the call."""


class Backend:
    """Base class: subclasses set ``name``/``how_to_get`` and override the ops they have."""

    name: str = ""
    how_to_get: str = ""

    def unavailable_reason(self) -> str | None:
        return None

    def unsupported_reason(self, op: str, tensors: Sequence[Tensor], strategy: str | None) -> str | None:
        return None

    def auto_reason(self, op: str, tensors: Sequence[Tensor], strategy: str | None) -> str | None:
        """Why ``auto`` should not pick this backend for the call (defaults to unsupported_reason)."""
        return self.unsupported_reason(op, tensors, strategy)

    def reconstruct(self, core: Tensor, factors: Sequence[Tensor], scale: float, base: Tensor | None) -> Tensor:
        raise NotImplementedError

    def project(self, t: Tensor, factors: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    def linear(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
        scale: float, dropout_p: float, strategy: str,
    ) -> Tensor:
        raise NotImplementedError

    def conv(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, core: Tensor, factors: Sequence[Tensor],
        scale: float, spec: ConvSpec, dropout_p: float, strategy: str,
    ) -> Tensor:
        raise NotImplementedError


_LOADERS: dict[str, Callable[[], Backend]] = {}
_INSTANCES: dict[str, Backend | str] = {}


def register(name: str, loader: Callable[[], Backend]) -> None:
    """Register a backend by a loader, called at first use (so import stays cheap)."""
    _LOADERS[name] = loader


def _load(name: str) -> Backend | str:
    """The backend instance, or the reason it could not be loaded."""
    if name not in _INSTANCES:
        if name not in _LOADERS:
            _INSTANCES[name] = "not registered"
        else:
            try:
                _INSTANCES[name] = _LOADERS[name]()
            except Exception as e:  # noqa: BLE001 - a broken optional backend must not break import
                _INSTANCES[name] = f"failed to load: {type(e).__name__}: {e}"
    return _INSTANCES[name]


def available_backends() -> dict[str, str]:
    """Every known backend -> "ok" or the reason it is unavailable on this machine."""
    out = {}
    for name in BACKEND_NAMES:
        b = _load(name)
        out[name] = b if isinstance(b, str) else (b.unavailable_reason() or "ok")
    return out


def resolve_backend_name(requested: str) -> str:
    """Validate a backend name; "auto" defers to the FLORA_BACKEND environment variable."""
    if requested == "auto":
        requested = os.environ.get("FLORA_BACKEND", "auto") or "auto"
    if requested != "auto" and requested not in BACKEND_NAMES:
        raise ValueError(f"backend: expected one of {('auto',) + BACKEND_NAMES}, got {requested!r}")
    return requested


def select_backend(requested: str, op: str, tensors: Sequence[Tensor], strategy: str | None) -> Backend:
    """The backend that serves this call; raises with every backend's reason when none can."""
    requested = resolve_backend_name(requested)
    if requested != "auto":
        b = _load(requested)
        reason = b if isinstance(b, str) else (b.unavailable_reason() or b.unsupported_reason(op, tensors, strategy))
        if reason is not None:
            how = "" if isinstance(b, str) else f" To get it: {b.how_to_get}"
            raise BackendUnavailable(f"backend {requested!r} cannot run {op}: {reason}.{how}")
        return b  # type: ignore[return-value]
    reasons = []
    for name in AUTO_ORDER:
        b = _load(name)
        reason = b if isinstance(b, str) else (b.unavailable_reason() or b.auto_reason(op, tensors, strategy))
        if reason is None:
            return b  # type: ignore[return-value]
        reasons.append(f"{name}: {reason}")
    raise BackendUnavailable(f"no backend can run {op}: " + "; ".join(reasons))

"""Backend registry: reference (always), triton, cuda and cpp (the compiled extension).

Each backend is loaded at first use; a missing optional dependency makes it unavailable with
a reason, never breaks ``import flora_kernels``. ``base.register`` adds more.
"""

from __future__ import annotations

from .base import (
    STRATEGIES,
    Backend,
    BackendUnavailable,
    Call,
    TensorSpec,
    auto_order,
    available_backends,
    backend_names,
    register,
    resolve_backend_name,
    unregister,
)

__all__ = [
    "STRATEGIES",
    "Backend",
    "BackendUnavailable",
    "Call",
    "TensorSpec",
    "auto_order",
    "available_backends",
    "backend_names",
    "register",
    "resolve_backend_name",
    "unregister",
]

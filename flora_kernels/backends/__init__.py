"""Backend registry: reference (always), triton, cuda and cpp (the compiled extension).

Each backend is loaded at first use; a missing optional dependency makes it unavailable with
a reason, never breaks ``import flora_kernels``.
"""

from __future__ import annotations

from .base import (
    AUTO_ORDER,
    BACKEND_NAMES,
    Backend,
    BackendUnavailable,
    available_backends,
    register,
    resolve_backend_name,
    select_backend,
)


def _reference() -> Backend:
    from .reference import ReferenceBackend

    return ReferenceBackend()


def _triton() -> Backend:
    from .triton import TritonBackend

    return TritonBackend()


def _cuda() -> Backend:
    from .cuda import CudaBackend

    return CudaBackend()


def _cpp() -> Backend:
    from .cuda import CppBackend

    return CppBackend()


register("reference", _reference)
register("triton", _triton)
register("cuda", _cuda)
register("cpp", _cpp)

__all__ = [
    "AUTO_ORDER",
    "BACKEND_NAMES",
    "Backend",
    "BackendUnavailable",
    "available_backends",
    "register",
    "resolve_backend_name",
    "select_backend",
]

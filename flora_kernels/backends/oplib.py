"""One idiom for an op's fake (meta) implementation, declared next to the op's definition.

Both kinds of op in this package get their fake the same way::

    @torch.library.custom_op("flora_triton::tucker2", mutates_args=())   # defined in Python
    def tucker2(...): ...

    @fake(tucker2)
    def _(...): ...                     # shapes / dtypes / devices of the outputs, no data

    @fake("flora::adapter_shrink")      # schema defined in C++ (csrc/flora_ops.cpp)
    def _(x, u_in, groups, p, seed): ...

A fake for a Python custom op is registered at once. An op whose schema lives in the compiled
extension only exists once the library is loaded, so its fake is kept until the loader calls
``register_pending(namespace)`` (``backends.ext.build.load_extension`` does); ``torch.compile``
and ``torch.library.opcheck`` then see the same kind of registration for both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch._library.custom_ops import CustomOpDef

F = TypeVar("F", bound=Callable[..., object])

_PENDING: dict[str, list[tuple[str, Callable[..., object]]]] = {}


def fake(op: CustomOpDef | str) -> Callable[[F], F]:
    """Decorator: the fake implementation of ``op`` (a custom op, or the "namespace::name" of a C++ op)."""

    def declare(fn: F) -> F:
        if isinstance(op, CustomOpDef):
            op.register_fake(fn)
        else:
            namespace, sep, name = op.partition("::")
            if not sep or not namespace or not name:
                raise ValueError(f"op: expected a custom op or a 'namespace::name' string, got {op!r}")
            _PENDING.setdefault(namespace, []).append((op, fn))
        return fn

    return declare


def register_pending(namespace: str) -> None:
    """Register every fake declared with ``fake("namespace::...")``; call once the ops exist (idempotent)."""
    for qualname, fn in _PENDING.pop(namespace, []):
        torch.library.register_fake(qualname, fn)

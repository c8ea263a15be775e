"""Memory figures of one training step: the bytes saved for backward and the device's peak.

- ``saved_bytes(forward, exclude)``: the tensors autograd saves for backward while ``forward``
  runs (``torch.autograd.graph.saved_tensors_hooks``), each storage counted once, the storages
  of ``exclude`` (parameters, buffers, the input) left out. Device independent: on a CPU it is
  the figure to compare.
- ``peak_bytes(step, device)``: CUDA only, the peak allocated during ``step()`` above what was
  allocated before it (``torch.cuda.max_memory_allocated``); None elsewhere ("n/a": the CPU
  allocator reports no peak that tracemalloc sees).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MiB = float(2**20)


def _storage_key(t: Tensor) -> tuple[int, int] | None:
    """(data pointer, bytes) of ``t``'s storage; None for tensors without one (subclasses)."""
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError) as e:
        log.debug("saved tensor without a storage: %s", e)
        return None
    ptr = st.data_ptr()
    return None if ptr == 0 else (ptr, st.nbytes())


def saved_bytes(forward: Callable[[], object], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the unique storages saved for backward while ``forward()`` runs (grad enabled),
    those of ``exclude`` left out. ``forward``'s result is dropped (the graph with it)."""
    skip = {k[0] for k in map(_storage_key, exclude) if k is not None}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        k = _storage_key(t)
        if k is not None and k[0] not in skip:
            seen[k[0]] = k[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
        out = forward()
    del out
    return sum(seen.values())


def peak_bytes(step: Callable[[], object], device: torch.device | str) -> int | None:
    """CUDA: the peak allocated during ``step()`` above what was allocated before it; else None."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    m0 = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - m0)


def mib(n: int | None) -> float | None:
    """Bytes to MiB (None stays None)."""
    return None if n is None else n / MiB


def fmt_mib(v: float | None) -> str:
    """A MiB figure for a table ("n/a" where the device reports none)."""
    return "n/a" if v is None else f"{v:.1f}"

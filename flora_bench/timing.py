"""Timing helpers shared by the benchmark's cases: quantiles, a paused garbage collector, the
clocks, and interleaved rounds.

Interleaved rounds: each round runs every candidate once, in an order rotated by one per round,
so that load drift on a shared machine hits all candidates alike; per-round ratios to a
reference candidate are then robust to that drift.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

# wall: elapsed time; cpu: this process's CPU time (every thread); thread: the calling thread's
# CPU time. With one torch thread, CPU time is the cost undistorted by other load.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time, "thread": time.thread_time}


def quantile(v: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``v`` (linear interpolation between order statistics)."""
    if not v:
        raise ValueError("quantile of an empty sequence")
    s = sorted(v)
    i = (len(s) - 1) * q
    lo, hi = math.floor(i), math.ceil(i)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


def quantiles(v: Sequence[float]) -> tuple[float, float, float]:
    """(median, 20% quantile, 80% quantile)."""
    return quantile(v, 0.5), quantile(v, 0.2), quantile(v, 0.8)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect once, then keep the garbage collector off (restored on exit)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def interleaved(
    fns: Mapping[str, Callable[[], object]], rounds: int, clock: str = "thread", warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each ``fns[name]`` over ``rounds`` interleaved rounds (rotating
    order), after ``warmup`` untimed rounds, with the garbage collector paused."""
    if clock not in CLOCKS:
        raise ValueError(f"clock: expected one of {tuple(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with gc_paused():
        for _ in range(warmup):
            for n in names:
                fns[n]()
        for r in range(rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                t0 = now()
                fns[n]()
                times[n].append(now() - t0)
    return times

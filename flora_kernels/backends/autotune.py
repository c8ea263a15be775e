"""Measured dispatch: which (backend, strategy) serves a call with ``backend="auto"`` and/or
``strategy="auto"``.

The candidates are every (backend, strategy) pair the request allows and the backends serve
(auto's backends in the registry's order; both strategies for "auto"). With one candidate
there is nothing to choose. Otherwise, per call signature (the ``Call``: op, shapes, dtypes,
layout, device, grad flags, dropout, threads) and requested backend:

1. in-memory decision, if any;
2. when measuring is on and not under torch.compile tracing: the on-disk cache (keyed also by
   the device's name, the torch / flora_kernels / triton versions), else a measurement on this
   call's own tensors: every candidate runs once at dropout 0 (warm-up and check: output and
   every gradient against the reference path, relative error within the compute dtype's
   tolerance, or, failing that, within a few times the reference path's own error against its
   float64 run (see ``_Verifier``); a candidate that disagrees or raises is dropped with an ``AutotuneWarning`` naming it), then
   the survivors are timed in interleaved rounds (forward, plus backward when the call needs
   gradients; the call's real dropout; CPU time of the calling thread on CPU with one torch
   thread, else wall time) within a time budget; the fastest median wins if it beat the cost
   model's pick in every round (else that pick stays: ties do not flip at random), and is kept
   in memory and written to disk. The caller's RNG state is restored afterwards;
3. else the cost model (``flora_kernels.plan``) picks the strategy and auto's order the backend.

Controls: ``FLORA_AUTOTUNE=0/1`` (default: 1, see docs/ARCHITECTURE.md for why), overridden by
``set_autotune(True/False)``; ``FLORA_AUTOTUNE_BUDGET_MS`` (default 100) bounds the timing of
one signature; ``FLORA_CACHE_DIR`` (default ``$XDG_CACHE_HOME/flora_kernels`` or
``~/.cache/flora_kernels``) holds ``autotune.json`` (also the backends' own measured choices,
``save_choice`` / ``cached_choice``: e.g. the Triton kernel variants). A corrupt, stale or unwritable cache is
ignored with a warning, never fatal. Inspect with ``dispatch_report()`` (every decision) and
``record_dispatch(model)`` (decisions per module during a step).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import math
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import astuple, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .base import (
    STRATEGIES,
    STRATEGY_OPS,
    Backend,
    BackendUnavailable,
    Call,
    auto_backends,
    call_reason,
    explicit_backend,
    load_backend,
    resolve_backend_name,
)

CACHE_FORMAT = 1
DEFAULT_BUDGET_MS = 100.0
MIN_ROUNDS, MAX_ROUNDS = 2, 7
# Relative-norm error against the reference path a candidate may show, per dtype (fp32 on
# CUDA allows TF32).
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
TOLERANCE_FP32_CUDA = 1e-2

# runner(backend, strategy, tensors, dropout_p) -> output: the op on these tensors (same order
# as the functional call passed them; None entries allowed).
Runner = Callable[[Backend, "str | None", Sequence["Tensor | None"], float], Tensor]


class AutotuneWarning(UserWarning):
    """Measured dispatch dropped a candidate or ignored its cache."""


@dataclass(frozen=True)
class Decision:
    """Which (backend, strategy) serves a call signature, and why.

    source: "measured" (timed now), "cached" (timed earlier, from disk), "cost-model"
    (nothing measured: ``flora_kernels.plan`` and auto's order), "single" (one candidate),
    "explicit" (backend and strategy both given). times_s: candidate label -> median seconds
    of its timed runs; dropped: candidate label -> why it was left out.
    """

    backend: str
    strategy: str | None
    source: str
    call: str
    times_s: tuple[tuple[str, float], ...] = ()
    dropped: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return _label(self.backend, self.strategy)

    def __str__(self) -> str:
        s = f"{self.label} [{self.source}] for {self.call}"
        if self.times_s:
            s += "; times: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in self.times_s)
        if self.dropped:
            s += "; dropped: " + ", ".join(f"{k} ({v})" for k, v in self.dropped)
        return s


def _label(backend: str, strategy: str | None) -> str:
    return backend if strategy is None else f"{backend}/{strategy}"


@dataclass
class _State:
    lock: threading.RLock = field(default_factory=threading.RLock)
    memo: dict[tuple[Call, str], Decision] = field(default_factory=dict)  # measured or cached
    planned: dict[tuple[Call, str], Decision] = field(default_factory=dict)  # cost model, measuring off
    disk: dict[str, dict] | None = None  # loaded lazily
    disk_path: Path | None = None
    warned: set[str] = field(default_factory=set)
    switch: bool | None = None
    local: threading.local = field(default_factory=threading.local)


_STATE = _State()


# ---- controls ----------------------------------------------------------------------------------
def set_autotune(enabled: bool | None) -> None:
    """Turn measured dispatch on or off for this process (None: back to ``FLORA_AUTOTUNE``).

    Decisions already made are kept; ``clear_autotune_cache()`` forgets them.
    """
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_autotune: expected True, False or None, got {enabled!r}")
    _STATE.switch = enabled


def autotune_enabled() -> bool:
    """Whether measured dispatch is on: ``set_autotune``, else ``FLORA_AUTOTUNE`` (default on)."""
    if _STATE.switch is not None:
        return _STATE.switch
    v = os.environ.get("FLORA_AUTOTUNE", "1").strip().lower()
    if v in ("0", "false", "off", "no"):
        return False
    if v in ("", "1", "true", "on", "yes"):
        return True
    _warn_once(f"env:{v}", f"FLORA_AUTOTUNE: expected 0 or 1, got {v!r}; measuring (the default)")
    return True


def clear_autotune_cache(disk: bool = False) -> None:
    """Forget every decision in memory (the backends' measured choices too, see ``on_clear``);
    ``disk=True`` also deletes the cache file."""
    with _STATE.lock:
        _STATE.memo.clear()
        _STATE.planned.clear()
        _STATE.disk = None
        _STATE.warned.clear()
        for hook in _CLEAR_HOOKS:
            hook()
        if disk:
            with contextlib.suppress(FileNotFoundError):
                cache_path().unlink()


def _budget_s() -> float:
    v = os.environ.get("FLORA_AUTOTUNE_BUDGET_MS", "")
    try:
        ms = float(v) if v else DEFAULT_BUDGET_MS
    except ValueError:
        _warn_once(f"budget:{v}", f"FLORA_AUTOTUNE_BUDGET_MS: expected milliseconds, got {v!r}; using {DEFAULT_BUDGET_MS}")
        ms = DEFAULT_BUDGET_MS
    return max(ms, 0.0) / 1e3


def _warn_once(key: str, msg: str) -> None:
    if key not in _STATE.warned:
        _STATE.warned.add(key)
        warnings.warn(msg, AutotuneWarning, stacklevel=4)


# ---- the disk cache ----------------------------------------------------------------------------
def cache_path() -> Path:
    """``$FLORA_CACHE_DIR/autotune.json`` (default: the user's cache dir / flora_kernels)."""
    root = os.environ.get("FLORA_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "flora_kernels")
    return Path(root) / "autotune.json"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


@functools.cache
def fingerprint() -> dict[str, object]:
    """What a cached timing depends on besides the call: library versions."""
    from .. import __version__

    return {"format": CACHE_FORMAT, "flora_kernels": __version__, "torch": torch.__version__,
            "triton": _version("triton")}


@functools.cache
def device_name(device: str) -> str:
    """A stable name of the device a call runs on (the CPU model, or the GPU's name)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} cpus)"


def _disk_key(call: Call, requested: str) -> str:
    return f"{device_name(call.device)}|{requested}|{astuple(call)!r}"


def _read_disk(path: Path, quiet: bool) -> dict[str, dict]:
    """The valid entries of the cache file (empty when missing, corrupt or stale)."""
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, ValueError) as e:
        if not quiet:
            _warn_once(f"corrupt:{path}", f"flora_kernels autotune cache {path} is unreadable ({type(e).__name__}: {e}); "
                       "ignoring it (it is rewritten at the next measurement)")
        return {}
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict) or not isinstance(doc.get("fingerprint"), dict):
        if not quiet:
            _warn_once(f"corrupt:{path}", f"flora_kernels autotune cache {path} is corrupt (not a cache document); "
                       "ignoring it")
        return {}
    if doc["fingerprint"] != fingerprint():
        if not quiet:
            _warn_once(f"stale:{path}", f"flora_kernels autotune cache {path} is stale (made with {doc['fingerprint']}, "
                       f"now {fingerprint()}); ignoring its entries")
        return {}
    out = {}
    for k, v in doc["entries"].items():
        if isinstance(v, dict) and (isinstance(v.get("choice"), str) if k.startswith(_CHOICE_PREFIX) else
                                    isinstance(v.get("backend"), str) and v.get("strategy") in STRATEGIES + (None,)):
            out[k] = v
        elif not quiet:
            _warn_once(f"entry:{path}", f"flora_kernels autotune cache {path} has malformed entries; ignoring them")
    return out


def _disk() -> dict[str, dict]:
    path = cache_path()
    if _STATE.disk is None or _STATE.disk_path != path:
        _STATE.disk, _STATE.disk_path = _read_disk(path, quiet=False), path
    return _STATE.disk


def _save(key: str, d: Decision) -> None:
    _write_entry(key, {"backend": d.backend, "strategy": d.strategy, "times_us": {k: v * 1e6 for k, v in d.times_s}})


def _write_entry(key: str, entry: dict) -> None:
    """Adds one entry to the cache file (atomically, merged with what other processes wrote)."""
    path = cache_path()
    entries = _disk()
    entries[key] = entry
    merged = {**_read_disk(path, quiet=True), **entries}  # keep what other processes wrote meanwhile
    doc = {"fingerprint": fingerprint(), "entries": merged}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        _warn_once(f"write:{path}", f"flora_kernels autotune cache {path} is not writable ({type(e).__name__}: {e}); "
                   "decisions stay in memory only (set FLORA_CACHE_DIR to a writable directory)")


# Backends' own measured choices (e.g. a kernel variant per shape) share the cache file and its
# invalidation (fingerprint, device name) under keys "choice:<namespace>|<device name>|<key>".
_CHOICE_PREFIX = "choice:"
_CLEAR_HOOKS: list[Callable[[], None]] = []


def _choice_key(namespace: str, device: str, key: str) -> str:
    return f"{_CHOICE_PREFIX}{namespace}|{device_name(device)}|{key}"


def cached_choice(namespace: str, device: str, key: str) -> tuple[str, dict[str, float]] | None:
    """(choice, candidate -> seconds) that ``save_choice`` recorded for ``key`` of ``namespace`` on a
    device of this name with these library versions, else None (a corrupt cache warns, see module doc)."""
    with _STATE.lock:
        hit = _disk().get(_choice_key(namespace, device, key))
    if hit is None:
        return None
    times = hit.get("times_us", {})
    ok = isinstance(times, dict)
    return hit["choice"], {str(k): float(v) / 1e6 for k, v in times.items() if isinstance(v, (int, float))} if ok else {}


def save_choice(namespace: str, device: str, key: str, choice: str, times_s: dict[str, float] | None = None) -> None:
    """Records a measured ``choice`` (with the candidates' times) for ``cached_choice`` in later processes."""
    with _STATE.lock:
        _write_entry(_choice_key(namespace, device, key), {"choice": choice, "times_us": {k: v * 1e6 for k, v in
                                                                                          (times_s or {}).items()}})


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the device's current stream (then nothing may be timed)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def on_clear(hook: Callable[[], None]) -> None:
    """Registers ``hook`` (forgets a backend's in-memory choices) to run in ``clear_autotune_cache``."""
    _CLEAR_HOOKS.append(hook)


# ---- candidates --------------------------------------------------------------------------------
def candidates(call: Call, requested: str) -> list[tuple[Backend, str | None]]:
    """Every (backend, strategy) serving ``call`` for the request, in auto's order, strategies
    in ``STRATEGIES`` order. Raises ``BackendUnavailable`` when there is none."""
    strategies: tuple[str | None, ...]
    if call.op in STRATEGY_OPS:
        strategies = STRATEGIES if call.strategy == "auto" else (call.strategy,)
    else:
        strategies = (None,)
    out: list[tuple[Backend, str | None]] = []
    reasons: list[str] = []
    for s in strategies:
        c = call if s is None else call.with_strategy(s)
        if requested == "auto":
            ok, why = auto_backends(c)
            out += [(b, s) for b in ok]
            reasons += [f"{s}: {r}" if s else r for r in why]
        else:
            b = load_backend(requested)
            reason = call_reason(b, c)
            if reason is None:
                out.append((b, s))  # type: ignore[arg-type]
            else:
                reasons.append(reason)
    if not out:
        if requested != "auto":  # the error names the backend, the reason and how to get it
            st = strategies[0] if len(strategies) == 1 else _cost_model_strategy(call)
            explicit_backend(requested, call if st is None else call.with_strategy(st))
        raise BackendUnavailable(f"no backend can run {call.op}: " + "; ".join(reasons))
    return out


def _cost_model_strategy(call: Call) -> str:
    from ..plan import plan_call

    return plan_call(call).strategy


def _cost_model(call: Call, cands: list[tuple[Backend, str | None]]) -> tuple[Backend, str | None]:
    strategies = {s for _, s in cands}
    want = _cost_model_strategy(call) if len(strategies) > 1 else next(iter(strategies))
    for b, s in cands:
        if s == want:
            return b, s
    return cands[0]


# ---- measuring ---------------------------------------------------------------------------------
def _tolerance(dtype: torch.dtype, device_type: str) -> float:
    if dtype == torch.float32 and device_type == "cuda":
        return TOLERANCE_FP32_CUDA
    return TOLERANCE.get(dtype, 5e-2)


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


class _Measurement:
    """Runs candidates on detached copies of one call's tensors (same grad flags)."""

    def __init__(self, call: Call, runner: Runner, tensors: Sequence[Tensor | None], dropout_p: float) -> None:
        self.call, self.runner, self.dropout_p = call, runner, dropout_p
        self.tensors = tensors
        self.grad = call.needs_grad
        self.dy: Tensor | None = None

    def run(self, b: Backend, s: str | None, p: float, exact: bool = False) -> list[Tensor]:
        """[output, grads of every input that requires grad]; times nothing. ``exact``: in float64
        with autocast off (the oracle the reference path itself is judged by)."""
        leaves = [None if t is None else self._leaf(t, exact) for t in self.tensors]
        with torch.set_grad_enabled(self.grad), torch.autocast(self.call.device_type, enabled=not exact and
                                                                 self.call.autocast is not None):
            y = self.runner(b, s, leaves, p)
        if not self.grad:
            return [y.detach()]
        if self.dy is None:
            self.dy = torch.randn_like(y)
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, wrt, self.dy.to(y.dtype), allow_unused=True)
        return [y.detach(), *[torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]]

    def _leaf(self, t: Tensor, exact: bool) -> Tensor:
        leaf = t.detach().double() if exact and t.is_floating_point() else t.detach()
        return leaf.requires_grad_(self.grad and t.requires_grad)

    def time(self, b: Backend, s: str | None) -> float:
        dev = self.call.device_type
        clock = _clock(self.call)
        _sync(dev)
        t0 = clock()
        self.run(b, s, self.dropout_p)
        _sync(dev)
        return clock() - t0


def _clock(call: Call) -> Callable[[], float]:
    """The clock candidates are timed with: on CPU with one torch thread the call runs on this
    thread alone, so its CPU time is its cost and other processes on the machine do not skew it;
    otherwise (threads, GPUs) wall time."""
    if call.device_type == "cpu" and call.threads == 1:
        return time.thread_time
    return time.perf_counter


def _rel_errs(out: Sequence[Tensor], ref: Sequence[Tensor]) -> list[float]:
    """Per tensor ||out - ref|| / ||ref|| (inf for a shape mismatch or a non-finite value)."""
    errs = []
    for o, r in zip(out, ref, strict=True):
        o64, r64 = o.detach().double(), r.detach().double()
        if o.shape != r.shape or not torch.isfinite(o64).all():
            errs.append(math.inf)
            continue
        errs.append(float((o64 - r64).norm() / r64.norm().clamp_min(1e-30)))
    return errs


class _Verifier:
    """Checks a candidate's output and gradients against the reference path on the call.

    A candidate passes when every tensor is within the compute dtype's tolerance of the
    reference path's. Where it is not (low precision, autocast, a gradient that nearly cancels),
    both are judged against the reference path run in float64: the candidate passes if it is
    within ``SLACK`` times the reference path's own error (or the tolerance) of that oracle.
    """

    SLACK = 4.0

    def __init__(self, m: _Measurement, ref_b: Backend, ref_s: str | None, tol: float) -> None:
        self.m, self.ref_b, self.ref_s, self.tol = m, ref_b, ref_s, tol
        self.ref = m.run(ref_b, ref_s, 0.0)
        self._exact: tuple[list[Tensor], list[float]] | None = None

    def error(self, out: Sequence[Tensor]) -> tuple[float, float]:
        """(the candidate's worst error, the bound it was held to)."""
        errs = _rel_errs(out, self.ref)
        if max(errs) <= self.tol:
            return max(errs), self.tol
        if self._exact is None:
            exact = self.m.run(self.ref_b, self.ref_s, 0.0, exact=True)
            self._exact = exact, _rel_errs(self.ref, exact)
        exact, ref_errs = self._exact
        bounds = [max(self.tol, self.SLACK * e) for e in ref_errs]
        errs = _rel_errs(out, exact)
        worst = max(range(len(errs)), key=lambda i: errs[i] / bounds[i])
        return errs[worst], bounds[worst]


def _measure(call: Call, cands: list[tuple[Backend, str | None]], runner: Runner,
             tensors: Sequence[Tensor | None], dropout_p: float) -> Decision:
    m = _Measurement(call, runner, tensors, dropout_p)
    ref_b = load_backend("reference")
    ref_s = "factorized" if call.op in STRATEGY_OPS else None
    dropped: dict[str, str] = {}
    tol = _tolerance(call.compute_dtype, call.device_type)
    devices = [torch.device(call.device)] if call.device_type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if isinstance(ref_b, str):
            raise RuntimeError(f"the reference backend failed to load: {ref_b}")  # noqa: TRY004
        verifier = _Verifier(m, ref_b, ref_s, tol)
        alive = []
        for b, s in cands:
            if b is ref_b and s == ref_s:
                alive.append((b, s))
                continue
            label = _label(b.name, s)
            try:
                err, bound = verifier.error(m.run(b, s, 0.0))
            except Exception as e:  # noqa: BLE001 - a failing candidate is dropped, not fatal
                dropped[label] = f"raised {type(e).__name__}: {e}"
                warnings.warn(f"flora_kernels autotune: dropped {label} for {call}: it raised "
                              f"{type(e).__name__}: {e}", AutotuneWarning, stacklevel=4)
                continue
            if not err <= bound:
                dropped[label] = f"relative error {err:.2e} > {bound:.1e} vs the reference path"
                warnings.warn(f"flora_kernels autotune: dropped {label} for {call}: it disagrees with the reference "
                              f"path (relative error {err:.2e} > {bound:.1e})", AutotuneWarning, stacklevel=4)
                continue
            alive.append((b, s))
        if not alive:  # nothing verified: what the cost model says (e.g. the explicitly requested backend)
            b, s = _cost_model(call, cands)
            return Decision(b.name, s, "cost-model", str(call), (), tuple(dropped.items()))
        times: dict[tuple[Backend, str | None], list[float]] = {c: [] for c in alive}
        deadline = time.perf_counter() + _budget_s()
        for r in range(MAX_ROUNDS):
            if r >= MIN_ROUNDS and time.perf_counter() > deadline:
                break
            k = r % len(alive)
            for c in alive[k:] + alive[:k]:  # rotate, so drift hits every candidate alike
                times[c].append(m.time(*c))
    med = {c: statistics.median(ts) for c, ts in times.items()}
    best = _winner(times, _cost_model(call, alive))
    return Decision(best[0].name, best[1], "measured", str(call),
                    tuple((_label(b.name, s), med[(b, s)]) for b, s in alive), tuple(dropped.items()))


def _winner(times: dict[tuple[Backend, str | None], list[float]],
            prior: tuple[Backend, str | None]) -> tuple[Backend, str | None]:
    """The candidate with the fastest median, if it beat ``prior`` (the cost model's pick) in every
    round; else ``prior``. Round-to-round variation of one call's time is 10-20% on a shared CPU,
    so a choice between near-equal candidates would otherwise flip at random between runs."""
    best = min(times, key=lambda c: statistics.median(times[c]))
    if best == prior or prior not in times:
        return best
    return best if all(a < b for a, b in zip(times[best], times[prior], strict=True)) else prior


# ---- resolution --------------------------------------------------------------------------------
def resolve(call: Call, requested: str, runner: Runner | None = None,
            tensors: Sequence[Tensor | None] = (), dropout_p: float = 0.0) -> tuple[Backend, str | None]:
    """The (backend, strategy) that serves ``call`` for backend ``requested`` (see module doc).

    ``runner`` and ``tensors`` let the first call of a signature measure the candidates; without
    them (or with measuring off, or under torch.compile) nothing is timed.
    """
    requested = resolve_backend_name(requested)
    if requested != "auto" and call.strategy != "auto":
        b = explicit_backend(requested, call)
        if getattr(_STATE.local, "recording", None) is not None:
            _note(Decision(b.name, call.strategy, "explicit", str(call)))
        return b, call.strategy
    key = (call, requested)
    compiling = torch.compiler.is_compiling()
    measuring = runner is not None and autotune_enabled()
    # memo: decisions while measuring (measured, cached, single, failed -> cost model);
    # planned: while not measuring (single, cost model). Traced code reads both, writes none.
    d = _STATE.memo.get(key) if measuring or compiling else None
    if d is None and (not measuring or compiling):
        d = _STATE.planned.get(key)
    if d is not None and not _loads(d.backend):  # decided before that backend became unavailable
        d = None
    if d is None:
        cands = candidates(call, requested)
        if len(cands) == 1:
            b, s = cands[0]
            d = Decision(b.name, s, "single", str(call))
        elif measuring and not compiling:
            d = _measured(call, requested, cands, runner, tensors, dropout_p)  # type: ignore[arg-type]
        else:
            b, s = _cost_model(call, cands)
            d = Decision(b.name, s, "cost-model", str(call))
        if not compiling:
            (_STATE.memo if measuring else _STATE.planned)[key] = d
    _note(d)
    return load_backend(d.backend), d.strategy  # type: ignore[return-value]


def _loads(name: str) -> bool:
    b = load_backend(name)
    return not isinstance(b, str) and b.unavailable_reason() is None


def _measured(call: Call, requested: str, cands: list[tuple[Backend, str | None]], runner: Runner,
              tensors: Sequence[Tensor | None], dropout_p: float) -> Decision:
    """The cached or newly measured decision (the cost model's if measuring failed)."""
    key = (call, requested)
    with _STATE.lock:
        d = _STATE.memo.get(key)
        if d is not None and _loads(d.backend):
            return d
        labels = {_label(b.name, s): (b, s) for b, s in cands}
        dk = _disk_key(call, requested)
        hit = _disk().get(dk)
        if hit is not None and _label(hit["backend"], hit["strategy"]) in labels:
            times = tuple((k, float(v) / 1e6) for k, v in hit.get("times_us", {}).items())
            d = Decision(hit["backend"], hit["strategy"], "cached", str(call), times)
        else:
            try:
                d = _measure(call, cands, runner, tensors, dropout_p)
            except Exception as e:  # noqa: BLE001 - measuring must never break the call
                _warn_once(f"measure:{call}", f"flora_kernels autotune: could not measure {call} "
                           f"({type(e).__name__}: {e}); using the cost model")
                b, s = _cost_model(call, cands)
                d = Decision(b.name, s, "cost-model", str(call), (), (("measurement", f"{type(e).__name__}: {e}"),))
            if d.source == "measured":
                _save(dk, d)
        _STATE.memo[key] = d
        return d


# ---- reports -----------------------------------------------------------------------------------
def dispatch_report() -> list[Decision]:
    """Every decision in memory (measured or cached), one per (call signature, request)."""
    with _STATE.lock:
        return list(_STATE.memo.values())


def _note(d: Decision) -> None:
    """Record a decision for an active ``record_dispatch`` (module on top of its stack)."""
    rec = getattr(_STATE.local, "recording", None)
    if rec is None or torch.compiler.is_compiling():
        return
    stack = _STATE.local.stack
    rec.setdefault(stack[-1] if stack else "", []).append(d)


@contextlib.contextmanager
def record_dispatch(model: nn.Module | None = None) -> Iterator[dict[str, list[Decision]]]:
    """Collect the decision of every dispatched call inside the block, keyed by the name of the
    innermost ``model`` submodule running it (e.g. the FLoRA layer), "" outside any.

        with fk.record_dispatch(model) as rep:
            model(x).sum().backward()
        for name, ds in rep.items(): print(name, ds[0])
    """
    rec: dict[str, list[Decision]] = {}
    local = _STATE.local
    if getattr(local, "recording", None) is not None:
        raise RuntimeError("record_dispatch: already recording in this thread")
    local.recording, local.stack = rec, []
    handles = []

    def push(name: str) -> Callable:
        def hook(module: nn.Module, args: object) -> None:
            local.stack.append(name)

        return hook

    def pop(module: nn.Module, args: object, out: object) -> None:
        local.stack.pop()

    if model is not None:
        for name, mod in model.named_modules():
            handles.append(mod.register_forward_pre_hook(push(name)))
            handles.append(mod.register_forward_hook(pop))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()
        local.recording = None

"""The dispatcher: every run-time choice of how a call runs, made once per call signature.

A *candidate* is (backend, strategy, variant): a registered backend, the strategy for ops that
have one ("factorized" or "merged" for linear/conv), and one of the backend's kernel variants
for that call (``Backend.variants``: e.g. Triton's GEMM "tma" / "tiled" / "cublas" for the
factorized Linear, "cudnn" / "igemm" for the factorized conv; most backends have none). Backends
only declare their candidates and why one cannot serve a call (``unsupported_reason``,
``auto_reason``, ``variant_reason``); they time nothing.

``resolve(call, backend, runner, tensors, dropout_p)`` picks the candidate for a call:

1. the request: the ``backend`` / ``call.strategy`` arguments; an "auto" part is filled by a
   forced choice (``force_dispatch("backend[/strategy[/variant]]")``, else the ``FLORA_BACKEND``
   environment variable of the same form), else chosen here. A forced variant applies to calls
   whose backend declares it (others keep their choice).
2. the candidates: every (backend, strategy, variant) the request allows that can serve the
   call (auto's backends in the registry's order, strategies in ``STRATEGIES`` order, variants
   in the backend's order: its default first). Under the "memory-aware" policy (the default,
   ``set_dispatch_policy`` / ``FLORA_DISPATCH_POLICY``), a training call (adapter gradients
   needed) drops an auto-chosen candidate that saves more bytes for backward than the
   factorized path (``plan.saved_bytes``: the merged path keeps the
   dense W + dW); policy "speed" keeps it. The cost model applies the same rule.
3. with one candidate there is nothing to choose; else, per (call, request, policy): the
   decision in memory, else (measuring on, not tracing, not capturing a CUDA graph) the one in
   the disk cache, else a measurement (``_measure``), else the cost model: ``flora_kernels.plan``
   picks the strategy, auto's order the backend, the backend's order the variant.

The measurement runs on detached copies of the call's own tensors. Verification: the reference
path runs once at dropout 0; each candidate's first run at dropout 0 is checked against it,
output and every gradient (``flora_kernels.testing``: relative error within the compute dtype's
tolerance, else the float64 rule against the reference path run in float64, computed only when
needed); a candidate that disagrees or raises is dropped with an ``AutotuneWarning``. Timing:
one clock (``_Clock``: the calling thread's CPU time on CPU with one torch thread, CUDA events
on a GPU, else wall time), forward plus backward when the call needs gradients. The
verification runs are cold (first runs at these shapes): their times (at dropout 0, the call's
own work when it has none) only prune (a candidate slower than ``PRUNE_RATIO`` times the fastest
is not timed; its first run stands) and size the budget. Before any run, a strategy the cost model
predicts ``PLAN_PRUNE`` (3) times slower than the other is left out (not run at all), and the
oracle is then the reference path in the remaining strategy. Then interleaved, rotated rounds of the
others at the call's dropout: at least ``MIN_ROUNDS``, at most ``MAX_ROUNDS``, stopped when the
leader is clear (its slowest round beats every other candidate's fastest) or the rounds cost
``BUDGET_RUNS`` times the verification runs (a budget proportional to the call's own cost),
capped by ``FLORA_AUTOTUNE_BUDGET_MS`` (default 100). A sample of a cheap call is the mean of
back-to-back runs filling ``MIN_SAMPLE_S`` (1 ms; at most ``MAX_REPS``), its budget scaled alike.

Winner (``_winner``): the verified candidate with the lowest median, unless its lead over the
cost model's pick is inside the measured noise; then the cost model's pick. The noise of a
candidate is half the range (max - min) of its rounds; a lead counts when it exceeds the larger
of the two candidates' noise (and 1% of the pick's median).

The decision is kept in memory and on disk (``$FLORA_CACHE_DIR/autotune.json``, keyed also by
the device's name and the torch / flora_kernels / triton versions; a corrupt, stale or
unwritable file is ignored with a warning). ``FLORA_AUTOTUNE=0`` / ``set_autotune(False)`` turns
measuring off (the cost model decides). ``dispatch_report()`` lists every decision with its
candidates' times, saved-bytes estimates, dropped candidates and the reason for the pick;
``record_dispatch(model)`` collects them per module during a step.
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
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..testing import rel_errs, tolerance, within_reference_error
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

CACHE_FORMAT = 2
DEFAULT_BUDGET_MS = 100.0
MIN_ROUNDS, MAX_ROUNDS = 2, 7
BUDGET_RUNS = 1.0  # timing budget after the first round: this many times its summed time
PRUNE_RATIO = 2.0  # after the first round, candidates slower than this times the fastest stop
MIN_SAMPLE_S, MAX_REPS = 1e-3, 16  # a timed sample repeats a cheap call up to this long (at most MAX_REPS runs)
# a strategy the cost model predicts this many times slower than the other is not run (convnext's
# depthwise factorized convs: predicted 3.5-7x, measured 9-15x slower; 3 saves ~0.13 s of its first step)
PLAN_PRUNE = 3.0
POLICIES = ("memory-aware", "speed")

# runner(backend, strategy, tensors, dropout_p) -> output: the op on these tensors (same order
# as the functional call passed them; None entries allowed).
Runner = Callable[[Backend, "str | None", Sequence["Tensor | None"], float], Tensor]


class AutotuneWarning(UserWarning):
    """The dispatcher dropped a candidate or ignored its cache."""


class Candidate(NamedTuple):
    """One way to run a call: a backend, its strategy (None for ops without one), its variant."""

    backend: Backend
    strategy: str | None
    variant: str | None = None

    @property
    def label(self) -> str:
        return _label(self.backend.name, self.strategy, self.variant)

    @property
    def bound(self) -> Backend:
        """The backend bound to this candidate's variant (what the runner is given)."""
        return self.backend.with_variant(self.variant)


def _label(backend: str, strategy: str | None, variant: str | None = None) -> str:
    return "/".join(p for p in (backend, strategy, variant) if p is not None)


@dataclass(frozen=True)
class Decision:
    """Which candidate serves a call signature, and why.

    source: "measured" (timed now), "cached" (timed earlier, from disk), "cost-model" (nothing
    measured: ``flora_kernels.plan``, auto's order, the backend's default variant), "single" (one
    candidate), "explicit" (backend and strategy given, no variants). times_s: candidate label ->
    median seconds of its timed runs; dropped: label -> why it was left out; saved_bytes: label
    -> estimated bytes saved for backward (``plan.saved_bytes``); reason: why this candidate won.
    """

    backend: str
    strategy: str | None
    source: str
    call: str
    times_s: tuple[tuple[str, float], ...] = ()
    dropped: tuple[tuple[str, str], ...] = ()
    variant: str | None = None
    saved_bytes: tuple[tuple[str, int], ...] = ()
    reason: str = ""

    @property
    def label(self) -> str:
        return _label(self.backend, self.strategy, self.variant)

    def __str__(self) -> str:
        s = f"{self.label} [{self.source}] for {self.call}"
        if self.reason:
            s += f" ({self.reason})"
        if self.times_s:
            s += "; times: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in self.times_s)
        if self.saved_bytes:
            s += "; saved for backward: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in self.saved_bytes)
        if self.dropped:
            s += "; dropped: " + ", ".join(f"{k} ({v})" for k, v in self.dropped)
        return s


@dataclass
class _State:
    lock: threading.RLock = field(default_factory=threading.RLock)
    memo: dict[tuple, Decision] = field(default_factory=dict)  # measured or cached
    planned: dict[tuple, Decision] = field(default_factory=dict)  # cost model, measuring off
    disk: dict[str, dict] | None = None  # loaded lazily
    disk_path: Path | None = None
    warned: set[str] = field(default_factory=set)
    switch: bool | None = None
    policy: str | None = None
    forced: str | None = None
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


@contextlib.contextmanager
def use_autotune(enabled: bool | None) -> Iterator[None]:
    """Measured dispatch on or off inside the block (None: as it is); the previous setting after."""
    before = _STATE.switch
    if enabled is not None:
        set_autotune(enabled)
    try:
        yield
    finally:
        _STATE.switch = before


def is_recording() -> bool:
    """Whether a ``record_dispatch`` block is collecting this thread's decisions (layers then run
    their calls through the dispatcher, not their bound ops, so that every call is noted)."""
    return getattr(_STATE.local, "recording", None) is not None


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


def set_dispatch_policy(policy: str | None) -> None:
    """"memory-aware" (the default): in training, auto never picks a candidate that saves
    materially more for backward than the factorized path; "speed": the fastest wins regardless.
    None: back to ``FLORA_DISPATCH_POLICY``."""
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"dispatch policy: expected one of {POLICIES} or None, got {policy!r}")
    _STATE.policy = policy


def dispatch_policy() -> str:
    """``set_dispatch_policy``'s policy, else ``FLORA_DISPATCH_POLICY`` (default "memory-aware")."""
    if _STATE.policy is not None:
        return _STATE.policy
    v = os.environ.get("FLORA_DISPATCH_POLICY", "").strip().lower() or POLICIES[0]
    if v not in POLICIES:
        raise ValueError(f"FLORA_DISPATCH_POLICY: expected one of {POLICIES}, got {v!r}")
    return v


def force_dispatch(choice: str | None) -> None:
    """Force ``"backend[/strategy[/variant]]"`` (any part may be "auto") wherever a call leaves that
    part to auto, e.g. "triton/factorized/igemm", "auto/merged", "cpp". None: back to the
    ``FLORA_BACKEND`` environment variable (same form). Explicit arguments always win."""
    if choice is not None:
        _parse_forced(choice, "force_dispatch")
    _STATE.forced = choice


def _parse_forced(choice: str, what: str) -> tuple[str, str, str]:
    parts = [p.strip() or "auto" for p in choice.split("/")]
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"{what}: expected 'backend[/strategy[/variant]]', got {choice!r}")
    backend, strategy, variant = (*parts, "auto", "auto")[:3]
    resolve_backend_name(backend)
    if strategy not in ("auto", *STRATEGIES):
        raise ValueError(f"{what}: expected a strategy in {('auto', *STRATEGIES)}, got {strategy!r} in {choice!r}")
    return backend, strategy, variant


def forced_choice() -> tuple[str, str, str]:
    """(backend, strategy, variant) forced by ``force_dispatch`` or ``FLORA_BACKEND`` ("auto" where free)."""
    if _STATE.forced is not None:
        return _parse_forced(_STATE.forced, "force_dispatch")
    v = os.environ.get("FLORA_BACKEND", "").strip()
    return _parse_forced(v, "FLORA_BACKEND") if v else ("auto", "auto", "auto")


def clear_autotune_cache(disk: bool = False) -> None:
    """Forget every decision in memory; ``disk=True`` also deletes the cache file."""
    with _STATE.lock:
        _STATE.memo.clear()
        _STATE.planned.clear()
        _STATE.disk = None
        _STATE.warned.clear()
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


def _valid_entry(v: object) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("backend"), str) and v.get("strategy") in STRATEGIES + (None,)
            and (v.get("variant") is None or isinstance(v.get("variant"), str)))


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
        if _valid_entry(v):
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
    """Adds one decision to the cache file (atomically, merged with what other processes wrote)."""
    path = cache_path()
    entries = _disk()
    entries[key] = {"backend": d.backend, "strategy": d.strategy, "variant": d.variant, "reason": d.reason,
                    "times_us": {k: v * 1e6 for k, v in d.times_s}}
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


def capturing(device: str) -> bool:
    """Whether a CUDA graph is being captured on the device's current stream (then nothing is timed)."""
    return device.startswith("cuda") and torch.cuda.is_current_stream_capturing()


# ---- candidates --------------------------------------------------------------------------------
def candidates(call: Call, requested: str, variant: str = "auto", auto_only: bool = True) -> list[Candidate]:
    """Every candidate serving ``call`` for backend ``requested`` (and ``call.strategy``), in auto's
    order. ``variant``: a forced variant (it replaces a backend's own where the backend declares
    it). ``auto_only=False``: also the candidates only an explicit request may run (e.g. the Triton
    interpreter); memory-aware pruning is ``resolve``'s. Raises ``BackendUnavailable`` when there is none."""
    return _candidates(call, requested, variant, auto_only)[0]


def _candidates(call: Call, requested: str, variant: str, auto_only: bool) -> tuple[list[Candidate], list[str]]:
    strategies: tuple[str | None, ...]
    if call.op in STRATEGY_OPS:
        strategies = STRATEGIES if call.strategy == "auto" else (call.strategy,)
    else:
        strategies = (None,)
    out: list[Candidate] = []
    reasons: list[str] = []
    for s in strategies:
        c = call if s is None else call.with_strategy(s)
        if requested == "auto":
            ok, why = auto_backends(c) if auto_only else _all_backends(c)
            reasons += [f"{s}: {r}" if s else r for r in why]
        else:
            b = load_backend(requested)
            reason = call_reason(b, c)
            ok = [b] if reason is None else []  # type: ignore[list-item]
            if reason is not None:
                reasons.append(reason)
        for b in ok:
            out += _variants(b, c, variant, auto_only)
    if not out:
        if requested != "auto":  # the error names the backend, the reason and how to get it
            st = strategies[0] if len(strategies) == 1 else _cost_model_strategy(call)
            explicit_backend(requested, call if st is None else call.with_strategy(st))
        raise BackendUnavailable(f"no backend can run {call.op}: " + "; ".join(reasons))
    return out, reasons


def _all_backends(call: Call) -> tuple[list[Backend], list[str]]:
    from .base import backend_names

    ok, reasons = [], []
    for name in backend_names():
        b = load_backend(name)
        reason = call_reason(b, call)
        if reason is None:
            ok.append(b)  # type: ignore[arg-type]
        else:
            reasons.append(f"{name}: {reason}")
    return ok, reasons


def _variants(b: Backend, call: Call, forced: str, auto: bool) -> list[Candidate]:
    """The candidates of backend ``b`` for ``call`` (strategy concrete): one per variant it may run."""
    declared = b.variants(call)
    if not declared:
        return [Candidate(b, call.strategy)]
    if forced != "auto" and forced in declared:
        reason = b.variant_reason(call, forced, auto=False)
        if reason is not None:
            raise BackendUnavailable(f"variant {_label(b.name, call.strategy, forced)} cannot run {call.op}: {reason}")
        return [Candidate(b, call.strategy, forced)]
    # ``auto``: the variants the dispatcher may choose among (an explicit backend too: the same rule)
    return [Candidate(b, call.strategy, v) for v in declared if b.variant_reason(call, v, auto=auto) is None] or \
        [Candidate(b, call.strategy, declared[0])]


def _cost_model_strategy(call: Call) -> str:
    from ..plan import plan_call

    return plan_call(call, dispatch_policy()).strategy


def _cost_model(call: Call, cands: Sequence[Candidate]) -> Candidate:
    """The cost model's strategy (``plan.plan_call`` under the dispatch policy); auto's first backend
    and that backend's first variant for it."""
    strategies = {c.strategy for c in cands}
    want = _cost_model_strategy(call) if len(strategies) > 1 else next(iter(strategies))
    for c in cands:
        if c.strategy == want:
            return c
    return cands[0]


# ---- measuring ---------------------------------------------------------------------------------
class _Clock:
    """The device's own clock: on CPU with one torch thread the calling thread's CPU time (other
    processes on the machine do not skew it); on a GPU CUDA events; else wall time."""

    def __init__(self, call: Call) -> None:
        self.cuda = call.device_type == "cuda"
        self.cpu_time = call.device_type == "cpu" and call.threads == 1

    def time(self, fn: Callable[[], object]) -> tuple[object, float]:
        """(fn(), the seconds it took)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end) / 1e3
        clock = time.thread_time if self.cpu_time else time.perf_counter
        t0 = clock()
        out = fn()
        return out, clock() - t0


class _Measurement:
    """Runs candidates on detached copies of one call's tensors (same grad flags)."""

    def __init__(self, call: Call, runner: Runner, tensors: Sequence[Tensor | None], dropout_p: float) -> None:
        self.call, self.runner, self.dropout_p = call, runner, dropout_p
        self.tensors = tensors
        self.grad = call.needs_grad
        self.dy: Tensor | None = None
        self.clock = _Clock(call)

    def run(self, c: Candidate, p: float, exact: bool = False) -> list[Tensor]:
        """[output, grads of every input that requires grad]. ``exact``: in float64 with autocast
        off (the oracle the reference path itself is judged by)."""
        leaves = [None if t is None else self._leaf(t, exact) for t in self.tensors]
        with torch.set_grad_enabled(self.grad), torch.autocast(self.call.device_type, enabled=not exact and
                                                                 self.call.autocast is not None):
            y = self.runner(c.bound, c.strategy, leaves, p)
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

    def timed(self, c: Candidate, p: float, reps: int = 1) -> tuple[list[Tensor], float]:
        """(``run(c, p)``, its time on the device's clock: the mean of ``reps`` back-to-back runs)."""
        def runs() -> list[Tensor]:
            for _ in range(reps - 1):
                self.run(c, p)
            return self.run(c, p)

        out, t = self.clock.time(runs)
        return out, t / reps  # type: ignore[return-value]


class _Verifier:
    """Checks a candidate's output and gradients against the reference path's (``flora_kernels.testing``:
    the dtype's tolerance, else the float64 rule; the float64 run is made only when needed)."""

    def __init__(self, m: _Measurement, ref: Candidate, ref_out: list[Tensor], tol: float) -> None:
        self.m, self.ref_c, self.ref, self.tol = m, ref, ref_out, tol
        self._exact: tuple[list[Tensor], list[float]] | None = None

    def check(self, out: Sequence[Tensor]) -> tuple[bool, float, float]:
        """(passes, the candidate's worst error, the bound it was held to)."""
        errs = rel_errs(out, self.ref)
        if max(errs) <= self.tol:
            return True, max(errs), self.tol
        if self._exact is None:
            exact = self.m.run(self.ref_c, 0.0, exact=True)
            self._exact = exact, rel_errs(self.ref, exact)
        exact, ref_errs = self._exact
        return within_reference_error(rel_errs(out, exact), ref_errs, self.tol)


def _measure(call: Call, cands: list[Candidate], runner: Runner, tensors: Sequence[Tensor | None],
             dropout_p: float) -> Decision:
    """Verify every candidate against the reference path, time the survivors, pick the winner (module doc)."""
    m = _Measurement(call, runner, tensors, dropout_p)
    ref_b = load_backend("reference")
    if isinstance(ref_b, str):
        raise RuntimeError(f"the reference backend failed to load: {ref_b}")  # noqa: TRY004
    dropped: dict[str, str] = {}
    cands = _plan_pruned(call, cands, dropped)
    # the oracle: the reference path, in the strategy the candidates keep (factorized when both)
    kept = {c.strategy for c in cands}
    ref = Candidate(ref_b, None if call.op not in STRATEGY_OPS else "factorized" if "factorized" in kept else "merged")
    tol = tolerance(call.compute_dtype, call.device_type)
    first: dict[Candidate, float] = {}  # verification runs' times (dropout 0 = the call's work when it has none)
    devices = [torch.device(call.device)] if call.device_type == "cuda" else []
    times: dict[Candidate, list[float]] = {}
    with torch.random.fork_rng(devices=devices):
        ref_out = m.run(ref, 0.0)  # the call's very first run pays its one-time costs: not a sample
        verifier = _Verifier(m, ref, ref_out, tol)
        for c in cands:
            if c == ref:
                times[c] = []
                continue
            try:
                out, t = m.timed(c, 0.0)
            except Exception as e:  # noqa: BLE001 - a failing candidate is dropped, not fatal
                dropped[c.label] = f"raised {type(e).__name__}: {e}"
                warnings.warn(f"flora_kernels autotune: dropped {c.label} for {call}: it raised "
                              f"{type(e).__name__}: {e}", AutotuneWarning, stacklevel=4)
                continue
            ok, err, bound = verifier.check(out)
            if not ok:
                dropped[c.label] = f"relative error {err:.2e} > {bound:.1e} vs the reference path"
                warnings.warn(f"flora_kernels autotune: dropped {c.label} for {call}: it disagrees with the reference "
                              f"path (relative error {err:.2e} > {bound:.1e})", AutotuneWarning, stacklevel=4)
                continue
            times[c] = []
            if dropout_p == 0:
                first[c] = t
        alive = list(times)
        if not alive:  # nothing verified: what the cost model says (e.g. the explicitly requested backend)
            c = _cost_model(call, cands)
            return _decision(call, c, "cost-model", dropped=dropped, reason="no candidate verified")
        _time_rounds(m, times, first)
    med = {c: statistics.median(ts) for c, ts in times.items() if ts}
    best, reason = _winner(times, _cost_model(call, alive))
    return _decision(call, best, "measured", tuple((c.label, med[c]) for c in alive if c in med), dropped, reason)


def _plan_pruned(call: Call, cands: list[Candidate], dropped: dict[str, str]) -> list[Candidate]:
    """``cands`` without the strategy the cost model predicts ``PLAN_PRUNE`` times slower than the
    other (its first run alone would cost that much; e.g. a depthwise conv's factorized path),
    each left out with its reason in ``dropped``. One strategy among the candidates: all kept."""
    if len({c.strategy for c in cands}) < 2:
        return cands
    from ..plan import plan_call

    p = plan_call(call.with_strategy("auto"), dispatch_policy())
    est = {"factorized": p.factorized_s, "merged": p.merged_s}
    fast = min(est, key=est.__getitem__)
    slow = max(est, key=est.__getitem__)
    if not est[fast] > 0 or est[slow] < PLAN_PRUNE * est[fast]:
        return cands
    for c in cands:
        if c.strategy == slow:
            dropped[c.label] = (f"not measured: the cost model predicts {est[slow] / est[fast]:.1f}x the time of "
                                f"{fast} (> {PLAN_PRUNE:g}x)")
    return [c for c in cands if c.strategy != slow]


def _time_rounds(m: _Measurement, times: dict[Candidate, list[float]], first: dict[Candidate, float]) -> None:
    """Timed rounds (rotated, so drift hits every candidate alike) into ``times``. ``first``: the
    verification runs' times (cold: they only prune and size the budget). Candidates slower than
    ``PRUNE_RATIO`` times the fastest first run are not timed (their first run stands); then rounds
    until the leader is clear or the budget (module doc) is spent, at least ``MIN_ROUNDS``, at most
    ``MAX_ROUNDS``. A cheap call is timed as the mean of back-to-back runs filling ``MIN_SAMPLE_S``
    (at most ``MAX_REPS``): single runs of tens of microseconds are mostly clock and scheduler
    noise; the budget grows with the repetitions (still capped by ``FLORA_AUTOTUNE_BUDGET_MS``)."""
    fastest = min(first.values(), default=0.0)
    alive = [c for c in times if c not in first or first[c] <= PRUNE_RATIO * fastest]
    for c, ts in times.items():
        if c in first and (c not in alive or len(alive) < 2):
            ts.append(first[c])
    if len(alive) < 2:
        return
    reps = max(1, min(MAX_REPS, math.ceil(MIN_SAMPLE_S / fastest))) if fastest > 0 else 1
    budget = min(_budget_s(), reps * BUDGET_RUNS * sum(first.get(c, fastest) for c in alive))
    for r in range(MAX_ROUNDS):
        if r >= MIN_ROUNDS and (_clear_leader(times, alive) or reps * sum(sum(times[c]) for c in alive) > budget):
            break
        k = r % len(alive)
        for c in alive[k:] + alive[:k]:
            times[c].append(m.timed(c, m.dropout_p, reps)[1])


def _clear_leader(times: dict[Candidate, list[float]], alive: list[Candidate]) -> bool:
    if len(alive) < 2:
        return True
    lead = min(alive, key=lambda c: statistics.median(times[c]))
    return all(max(times[lead]) < min(times[c]) for c in alive if c != lead)


def _noise(ts: Sequence[float]) -> float:
    """Half the range of a candidate's rounds: how far its median may be off."""
    return (max(ts) - min(ts)) / 2 if len(ts) > 1 else 0.0


def _winner(times: dict[Candidate, list[float]], prior: Candidate) -> tuple[Candidate, str]:
    """The verified candidate with the lowest median, unless its lead over ``prior`` (the cost
    model's pick) is within the noise of either (``_noise``) or 1% of prior's median; then ``prior``."""
    timed = {c: ts for c, ts in times.items() if ts}
    if not timed:
        return prior, "not timed: the cost model's pick"
    best = min(timed, key=lambda c: statistics.median(timed[c]))
    if best == prior or prior not in timed:
        return best, "fastest verified"
    lead = statistics.median(timed[prior]) - statistics.median(timed[best])
    noise = max(_noise(timed[best]), _noise(timed[prior]), 0.01 * statistics.median(timed[prior]))
    if lead > noise:
        return best, f"fastest verified ({lead * 1e6:.1f} us ahead of the cost model's pick, noise {noise * 1e6:.1f} us)"
    return prior, f"the cost model's pick ({best.label} leads by {lead * 1e6:.1f} us, within the noise {noise * 1e6:.1f} us)"


def _decision(call: Call, c: Candidate, source: str, times: tuple[tuple[str, float], ...] = (),
              dropped: dict[str, str] | None = None, reason: str = "", saved: tuple[tuple[str, int], ...] = ()) -> Decision:
    return Decision(c.backend.name, c.strategy, source, str(call), times, tuple((dropped or {}).items()), c.variant,
                    saved, reason)


# ---- resolution --------------------------------------------------------------------------------
def resolve(call: Call, requested: str, runner: Runner | None = None,
            tensors: Sequence[Tensor | None] = (), dropout_p: float = 0.0) -> tuple[Backend, str | None]:
    """The (backend bound to its variant, strategy) that serves ``call`` for backend ``requested``.

    ``runner`` and ``tensors`` let the first call of a signature measure the candidates; without
    them (or with measuring off, under torch.compile, or during CUDA graph capture) nothing is
    timed. The decision depends only on the call's signature, the request, the policy and the
    forced choice: it may be reused for every later call with the same ``Call``.
    """
    requested = resolve_backend_name(requested)
    f_backend, f_strategy, f_variant = forced_choice()
    if requested == "auto":
        requested = f_backend
    if call.strategy == "auto" and f_strategy != "auto":
        call = call.with_strategy(f_strategy)
    key = (call, requested, f_variant, dispatch_policy())
    compiling = torch.compiler.is_compiling()
    measuring = runner is not None and autotune_enabled()
    # memo: decisions while measuring (measured, cached, single, failed -> cost model);
    # planned: while not measuring (single, explicit, cost model). Traced code reads both, writes none.
    d = _STATE.memo.get(key) if measuring or compiling else None
    if d is None and (not measuring or compiling):
        d = _STATE.planned.get(key)
    if d is None and measuring and not compiling and capturing(call.device):  # a CUDA graph: nothing is timed
        measuring = False
        d = _STATE.planned.get(key)
    if d is not None and not _loads(d.backend):  # decided before that backend became unavailable
        d = None
    if d is None:
        d = _decide(call, requested, f_variant, measuring and not compiling, runner, tensors, dropout_p)
        if not compiling:
            (_STATE.memo if measuring else _STATE.planned)[key] = d
    _note(d)
    b = load_backend(d.backend)
    return b.with_variant(d.variant), d.strategy  # type: ignore[union-attr]


def _decide(call: Call, requested: str, variant: str, measuring: bool, runner: Runner | None,
            tensors: Sequence[Tensor | None], dropout_p: float) -> Decision:
    if requested != "auto" and call.strategy != "auto":
        b = explicit_backend(requested, call)
        if not b.variants(call):
            return _decision(call, Candidate(b, call.strategy), "explicit", reason="backend and strategy given")
    cands, _ = _candidates(call, requested, variant, auto_only=True)
    dropped: dict[str, str] = {}
    saved: tuple[tuple[str, int], ...] = ()
    if call.op in STRATEGY_OPS and call.needs_grad:
        from ..plan import memory_reason, saved_bytes

        saved = tuple((c.label, saved_bytes(call.with_strategy(c.strategy))) for c in cands)  # type: ignore[arg-type]
        if call.strategy == "auto":  # an explicit strategy is the user's choice
            keep = []
            for c in cands:
                why = memory_reason(call, c.strategy, dispatch_policy())  # type: ignore[arg-type]
                if why is None:
                    keep.append(c)
                else:
                    dropped[c.label] = why
            cands = keep or cands
    if len(cands) == 1:
        return _decision(call, cands[0], "single", dropped=dropped, reason="the only candidate", saved=saved)
    if measuring:
        d = _measured(call, requested, variant, cands, runner, tensors, dropout_p)  # type: ignore[arg-type]
    else:
        d = _decision(call, _cost_model(call, cands), "cost-model", reason="measuring off: the cost model's pick")
    return Decision(d.backend, d.strategy, d.source, d.call, d.times_s, (*tuple(dropped.items()), *d.dropped),
                    d.variant, saved, d.reason)


def _loads(name: str) -> bool:
    b = load_backend(name)
    return not isinstance(b, str) and b.unavailable_reason() is None


def _disk_key(call: Call, requested: str, variant: str) -> str:
    return f"{device_name(call.device)}|{requested}|{variant}|{dispatch_policy()}|{astuple(call)!r}"


def _measured(call: Call, requested: str, variant: str, cands: list[Candidate], runner: Runner,
              tensors: Sequence[Tensor | None], dropout_p: float) -> Decision:
    """The cached or newly measured decision (the cost model's if measuring failed)."""
    with _STATE.lock:
        by_label = {c.label: c for c in cands}
        dk = _disk_key(call, requested, variant)
        hit = _disk().get(dk)
        if hit is not None and _label(hit["backend"], hit["strategy"], hit.get("variant")) in by_label:
            c = by_label[_label(hit["backend"], hit["strategy"], hit.get("variant"))]
            times = tuple((k, float(v) / 1e6) for k, v in hit.get("times_us", {}).items())
            return _decision(call, c, "cached", times, reason=str(hit.get("reason", "")))
        try:
            d = _measure(call, cands, runner, tensors, dropout_p)
        except Exception as e:  # noqa: BLE001 - measuring must never break the call
            _warn_once(f"measure:{call}", f"flora_kernels autotune: could not measure {call} "
                       f"({type(e).__name__}: {e}); using the cost model")
            return _decision(call, _cost_model(call, cands), "cost-model", dropped={"measurement": f"{type(e).__name__}: {e}"},
                             reason="measurement failed: the cost model's pick")
        if d.source == "measured":
            _save(dk, d)
        return d


# ---- reports -----------------------------------------------------------------------------------
def dispatch_report() -> list[Decision]:
    """Every decision in memory that chose among candidates or found one (measured, cached,
    cost-model, single; not "explicit"), one per (call signature, request)."""
    with _STATE.lock:
        return [d for d in (*_STATE.memo.values(), *_STATE.planned.values()) if d.source != "explicit"]


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

"""The benchmark harness: providers x modes x shapes, checked against the reference, then timed.

Used by ``flora-bench`` (``flora_bench.cli``), by the pytest-benchmark suites in ``bench/``
(through ``build_case``) and by ``tests/bench/test_harness.py``.

For each shape:

1. ``Materials``: the frozen base layer, one random non-zero FLoRA adapter, x and dy.
2. The oracle: this project's reference path (FLoRA layer, reference backend) run in float64
   on upcast copies: y, dx and the gradients of core and every factor.
3. Every selected provider is built (or skipped, with the reason) and checked once per mode
   family it will be timed in: training (y, dx and its parameter gradients mapped back to
   FLoRA's core and factors), inference (y), merged inference (y). The figure is the relative
   error ||out - ref|| / ||ref||; a value above the dtype's tolerance
   (``flora_kernels.testing.tolerance``) stops
   the run with ``CorrectnessError`` naming provider, shape, mode, tensor and error (or, with
   ``keep_going``, marks the provider FAIL and leaves it out of the timing).
4. Per mode, the providers are timed in interleaved rounds (each round runs every provider
   once, in a rotating order), so that load drift on a shared machine hits all of them alike;
   the ratio to the frozen base is taken per round and its median reported (with 20/80
   quantiles). GPU: torch.cuda.Event around each call, L2 flushed (256 MiB write) before
   each; CPU: time.perf_counter, garbage collector paused.

Modes: ``fwd`` (training forward: x requires grad, graph recorded), ``bwd`` (backward alone:
dx and adapter grads, base frozen), ``full`` (the training step: fwd + bwd), ``infer``
(no-grad forward, adapter unmerged), ``merged`` (no-grad forward with the merged weights
precomputed; should equal the base).

Memory: on GPU the peak allocated during one call above what was allocated before it
(``torch.cuda.max_memory_allocated``); everywhere, for training modes, the bytes the forward
saves for backward (activations, through ``torch.autograd.graph.saved_tensors_hooks``, unique
storages, parameters and x excluded). No CPU peak figure ("n/a"): tracemalloc does not see
torch's allocator.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from flora_kernels.layers import FLoRAConv2d, FLoRALinear
from flora_kernels.testing import rel_err, tolerance

from . import counts
from .counts import MODES
from .env import environment, loadavg
from .memory import mib, peak_bytes, saved_bytes
from .providers import (
    Built,
    Materials,
    Provider,
    SkipProvider,
    backends_status,
    default_providers,
    flora_layer,
    make_materials,
)
from .shapes import Shape
from .timing import gc_paused, quantiles

log = logging.getLogger(__name__)

MODE_ALIASES = {
    "forward": "fwd",
    "fwd": "fwd",
    "backward": "bwd",
    "bwd": "bwd",
    "full": "full",
    "train": "full",
    "fwd+bwd": "full",
    "forward+backward": "full",
    "infer": "infer",
    "inference": "infer",
    "merged": "merged",
    "infer-merged": "merged",
}
TRAINING_MODES = ("fwd", "bwd", "full")
# Modes are timed in this order, so that a --max-minutes cut drops the least important last.
RUN_ORDER = ("full", "infer", "fwd", "bwd", "merged")

@dataclass(frozen=True)
class Budget:
    """Repetitions per provider per (shape, mode): ``warmup`` rounds, then rounds until at
    least ``min_reps`` and either ``seconds`` per provider spent or ``max_reps``."""

    warmup: int
    min_reps: int
    max_reps: int
    seconds: float


BUDGETS = {
    ("cpu", True): Budget(1, 5, 30, 0.15),
    ("cpu", False): Budget(2, 10, 200, 0.8),
    ("cuda", True): Budget(2, 10, 50, 0.1),
    ("cuda", False): Budget(3, 20, 200, 0.25),
}


@dataclass
class BenchConfig:
    """What to run. ``providers``: fnmatch patterns over provider names (None: all); the
    frozen base is always included. ``extra_providers``: more providers (tests use this)."""

    device: str = "cpu"
    shapes: Sequence[Shape] = ()
    providers: Sequence[str] | None = None
    modes: Sequence[str] = MODES
    quick: bool = False
    budget: Budget | None = None
    keep_going: bool = False
    max_minutes: float | None = None
    seed: int = 0
    progress: bool = True
    extra_providers: Sequence[Provider] = ()

    def resolved_budget(self) -> Budget:
        return self.budget or BUDGETS[("cpu" if self.device == "cpu" else "cuda", self.quick)]


class CorrectnessError(AssertionError):
    """A provider disagrees with the reference path (or raised)."""


def normalize_modes(modes: Iterable[str]) -> tuple[str, ...]:
    out = []
    for m in modes:
        key = m.strip().lower()
        if key not in MODE_ALIASES:
            raise ValueError(f"unknown mode {m!r}: expected one of {MODES} (aliases: {', '.join(MODE_ALIASES)})")
        if MODE_ALIASES[key] not in out:
            out.append(MODE_ALIASES[key])
    return tuple(m for m in MODES if m in out)


def select_providers(patterns: Sequence[str] | None, catalog: Sequence[Provider]) -> tuple[list[Provider], set[str]]:
    """Providers whose name matches a pattern (base always first) and the names asked for
    exactly (an exact name lifts the default skips: Triton on CPU, compile in --quick)."""
    if not patterns:
        return list(catalog), set()
    chosen, explicit, unmatched = [], set(), []
    for pat in patterns:
        hits = [p for p in catalog if fnmatch.fnmatchcase(p.name, pat)]
        if not hits:
            unmatched.append(pat)
        if pat in {p.name for p in catalog}:
            explicit.add(pat)
        chosen += [p for p in hits if p not in chosen]
    if unmatched:
        raise ValueError(f"no provider matches {unmatched}: known providers are {', '.join(p.name for p in catalog)}")
    base = [p for p in catalog if p.name == "base"]
    return base + [p for p in catalog if p in chosen and p.name != "base"], explicit


# --------------------------------------------------------------------------------------
# Correctness


def compute_oracle(mat: Materials) -> dict[str, Tensor]:
    """The reference path in float64: y, dx, and d core, d factors[n]."""
    base64 = copy.deepcopy(mat.base).double()
    s = mat.shape
    cls = FLoRALinear if s.op == "linear" else FLoRAConv2d
    layer = cls(
        base64, rank=s.rank, kernel_rank=s.kernel_rank, scale=mat.scale, strategy="factorized", backend="reference"
    )
    with torch.no_grad():
        for d, v in zip([layer.core, *layer.factors], mat.flora_params):
            d.copy_(v)
    x = mat.x.detach().double().contiguous().requires_grad_(True)
    with torch.enable_grad():
        y = layer(x)
        y.backward(mat.dy.double())
    out = {"y": y.detach(), "dx": x.grad}
    out["core"] = layer.core.grad
    for i, f in enumerate(layer.factors):
        out[f"factors[{i}]"] = f.grad
    return out


def _clear(b: Built, xr: Tensor) -> None:
    xr.grad = None
    for p in b.params:
        p.grad = None


def check_provider(b: Built, mat: Materials, oracle: dict[str, Tensor], modes: Sequence[str]) -> dict:
    """Run ``b`` once per mode family and compare with the oracle.

    Returns {"errors": {"<family>:<tensor>": rel_err}, "max": worst, "tol": tolerance}.
    Exceptions propagate (the caller decides whether they mean skip or failure).
    """
    errs: dict[str, float] = {}
    if any(m in TRAINING_MODES for m in modes):
        xr = mat.x.detach().clone().requires_grad_(True)
        _clear(b, xr)
        with torch.enable_grad():
            y = b.forward(xr)
            y.backward(mat.dy)
        if b.adapted:
            errs["train:y"] = rel_err(y, oracle["y"])
            errs["train:dx"] = rel_err(xr.grad, oracle["dx"])
            if b.to_flora is not None:
                missing = [i for i, p in enumerate(b.params) if p.grad is None]
                mapped = b.to_flora([p.grad for p in b.params])
                names = ["core"] + [f"factors[{i}]" for i in range(len(mapped) - 1)]
                for n, g in zip(names, mapped):
                    errs[f"train:d{n}"] = math.inf if missing else rel_err(g, oracle[n])
        _clear(b, xr)
    if "infer" in modes and b.adapted:
        with torch.no_grad():
            errs["infer:y"] = rel_err(b.forward(mat.x), oracle["y"])
    if "merged" in modes and b.adapted and b.merged_forward is not None:
        with torch.no_grad():
            errs["merged:y"] = rel_err(b.merged_forward(mat.x), oracle["y"])
    # The provider runs in the shape's dtype, the oracle in float64: the reference path's own
    # tolerance in that dtype (flora_kernels.testing) bounds both the provider's rounding and
    # the reference path's, so it is the bound here too.
    tol = tolerance(mat.shape.torch_dtype, mat.device.type)
    return {"errors": errs, "max": max(errs.values(), default=0.0), "tol": tol}


# --------------------------------------------------------------------------------------
# Timing


class Step:
    """One provider in one mode: ``setup()`` (untimed) then ``run()`` (timed)."""

    def __init__(self, b: Built, mode: str, mat: Materials, xr: Tensor) -> None:
        self.b, self.mode, self.mat, self.xr = b, mode, mat, xr
        self.y: Tensor | None = None

    def setup(self) -> None:
        self.y = None
        _clear(self.b, self.xr)
        if self.mode == "bwd":
            with torch.enable_grad():
                self.y = self.b.forward(self.xr)

    def run(self) -> None:
        m, b = self.mode, self.b
        if m == "fwd":
            with torch.enable_grad():
                self.y = b.forward(self.xr)
        elif m == "bwd":
            assert self.y is not None
            self.y.backward(self.mat.dy)
        elif m == "full":
            with torch.enable_grad():
                self.y = b.forward(self.xr)
                self.y.backward(self.mat.dy)
        elif m == "infer":
            with torch.no_grad():
                self.y = b.forward(self.mat.x)
        else:
            assert b.merged_forward is not None
            with torch.no_grad():
                self.y = b.merged_forward(self.mat.x)

    def teardown(self) -> None:
        self.y = None
        _clear(self.b, self.xr)


class Clock:
    """Times one round of steps: CUDA events with an L2 flush before each call, or
    perf_counter on CPU. Returns milliseconds."""

    FLUSH_BYTES = 256 << 20

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(self.FLUSH_BYTES, dtype=torch.uint8, device=device) if self.cuda else None

    def round(self, steps: Sequence[Step]) -> list[float]:
        if self.cuda:
            evs = []
            for st in steps:
                st.setup()
                self.flush.zero_()  # type: ignore[union-attr]
                a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                st.run()
                e.record()
                evs.append((a, e))
            torch.cuda.synchronize()
            return [a.elapsed_time(e) for a, e in evs]
        out = []
        for st in steps:
            st.setup()
            t0 = time.perf_counter()
            st.run()
            out.append((time.perf_counter() - t0) * 1e3)
        return out


def time_steps(steps: Sequence[Step], clock: Clock, budget: Budget, deadline: float | None) -> list[list[float]]:
    """Interleaved rounds (rotating order); per-step lists of milliseconds."""
    n = len(steps)
    times: list[list[float]] = [[] for _ in range(n)]
    with gc_paused():
        for _ in range(budget.warmup):
            clock.round(steps)
        t_start = time.perf_counter()
        r = 0
        while True:
            k = r % n
            order = list(range(k, n)) + list(range(k))
            ms = clock.round([steps[i] for i in order])
            for i, t in zip(order, ms):
                times[i].append(t)
            r += 1
            if r >= budget.max_reps:
                break
            if r >= budget.min_reps:
                spent = time.perf_counter() - t_start
                if spent >= budget.seconds * n or (deadline is not None and time.perf_counter() > deadline):
                    break
    for st in steps:
        st.teardown()
    return times


def provider_saved_bytes(b: Built, xr: Tensor, exclude: Iterable[Tensor]) -> int | None:
    """Bytes the provider's training forward saves for backward (``exclude``: params, x);
    None when the forward raises (logged)."""
    try:
        return saved_bytes(lambda: b.forward(xr), exclude)
    except Exception as e:  # noqa: BLE001
        log.info("saved-bytes measurement failed for %s: %s", b.name, e)
        return None
    finally:
        _clear(b, xr)


def peak_step_bytes(step: Step, device: torch.device) -> int | None:
    """CUDA only: the peak allocated during one ``step.run()`` above what was allocated before it."""
    if device.type != "cuda":
        return None
    step.setup()
    try:
        return peak_bytes(step.run, device)
    finally:
        step.teardown()


# --------------------------------------------------------------------------------------
# The run


def plans_for(mat: Materials) -> dict[str, dict]:
    """What ``strategy="auto"`` picks for this shape, training and inference, with costs."""
    layer = flora_layer(mat, "auto", "reference")
    out = {}
    xr = mat.x.detach().requires_grad_(True)
    for key, grad in (("train", True), ("infer", False)):
        with torch.set_grad_enabled(grad):
            p = layer.plan(xr if grad else mat.x)
        out[key] = {"strategy": p.strategy, "factorized_us": p.factorized_s * 1e6, "merged_us": p.merged_s * 1e6}
    return out


def _modes_for(b: Built, modes: Sequence[str]) -> list[str]:
    return [m for m in modes if m != "merged" or b.merged_forward is not None]


def _short(e: BaseException, n: int = 300) -> str:
    s = f"{type(e).__name__}: {e}".replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


def _fail_message(provider: str, shape: str, check: dict) -> str:
    bad = {k: v for k, v in check["errors"].items() if not v <= check["tol"]}
    k, v = max(bad.items(), key=lambda kv: kv[1])
    mode, tensor = k.split(":", 1)
    return (
        f"correctness check failed: provider {provider!r} on shape {shape!r} ({mode} mode): tensor {tensor} has "
        f"relative error {v:.3g} (||out - ref|| / ||ref|| against the float64 reference path), tolerance "
        f"{check['tol']:.1g}"
        + (f"; also failing: {', '.join(f'{a}={b:.3g}' for a, b in bad.items() if a != k)}" if len(bad) > 1 else "")
    )


class _Run:
    """One ``run``: the result document and the steps that fill it, shape by shape."""

    def __init__(self, cfg: BenchConfig, on_row: Callable[[dict], None] | None) -> None:
        self.cfg, self.on_row = cfg, on_row
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch.cuda.is_available() is False on this machine")
        self.modes = normalize_modes(cfg.modes)
        self.budget = cfg.resolved_budget()
        catalog = default_providers() + list(cfg.extra_providers)
        self.providers, explicit = select_providers(cfg.providers, catalog)
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + cfg.max_minutes * 60 if cfg.max_minutes else None
        self.result = self._document()
        self.ctx: dict = {"backends": self.result["backends"], "explicit": explicit, "quick": cfg.quick, "plans": {}}
        self.bar = None

    def _document(self) -> dict:
        cfg, device = self.cfg, self.device
        return {
            "meta": environment(device),
            "config": {
                "device": str(device),
                "quick": cfg.quick,
                "modes": list(self.modes),
                "seed": cfg.seed,
                "providers": [p.name for p in self.providers],
                "provider_patterns": list(cfg.providers or []),
                "shapes": [s.name for s in cfg.shapes],
                "budget": asdict(self.budget),
                "keep_going": cfg.keep_going,
                "max_minutes": cfg.max_minutes,
                "timing": "CUDA events, L2 flushed before each call"
                if device.type == "cuda"
                else "time.perf_counter, gc paused",
                "tolerance": {
                    str(dt).replace("torch.", ""): tolerance(dt, device.type)
                    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
                },
            },
            "backends": backends_status(),
            "shapes": [],
            "checks": [],
            "rows": [],
            "skipped": [],
            "notes": [],
        }

    # ---- small helpers ----
    def _skip(self, shape: str, provider: str, mode: str, reason: str) -> None:
        self.result["skipped"].append({"shape": shape, "provider": provider, "mode": mode, "reason": reason})

    def _out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def _time_reason(self) -> str:
        return f"time budget (--max-minutes {self.cfg.max_minutes}) exhausted"

    def _progress(self, desc: str | None = None, advance: int = 0) -> None:
        if self.bar is None:
            return
        if desc is not None:
            self.bar.set_description(desc)
        if advance:
            self.bar.update(advance)

    def _fail(self, shape: str, provider: str, msg: str, cause: BaseException | None = None) -> None:
        """A provider failed to build or raised: recorded with --keep-going, else raised."""
        if not self.cfg.keep_going:
            raise CorrectnessError(msg) from cause
        self.result["checks"].append({"shape": shape, "provider": provider, "status": "FAIL", "message": msg, "errors": {}})

    # ---- the run ----
    def __call__(self) -> dict:
        cfg = self.cfg
        if cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(cfg.shapes) * (1 + len(self.modes)), desc="flora-bench", unit="step", leave=False)
        try:
            for si, shape in enumerate(cfg.shapes):
                self.run_shape(si, shape)
        except CorrectnessError as e:
            e.result = self.result  # type: ignore[attr-defined]  # the partial document, for the reports
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
            self.result["meta"]["elapsed_s"] = time.perf_counter() - self.t0
            self.result["meta"]["loadavg_end"] = loadavg()
        return self.result

    def run_shape(self, si: int, shape: Shape) -> None:
        """Materials, oracle, every provider built and checked, then every mode timed."""
        if self._out_of_time():
            self._skip(shape.name, "all providers", "*", self._time_reason())
            self._progress(advance=1 + len(self.modes))
            return
        self._progress(f"{shape.name}: build+check")
        mat = make_materials(shape, self.device, seed=self.cfg.seed + si)
        plans = plans_for(mat)
        self.ctx["plans"][shape.name] = {k: v["strategy"] for k, v in plans.items()}
        oracle = compute_oracle(mat)
        shape_doc = _shape_doc(shape, mat, plans)
        self.result["shapes"].append(shape_doc)
        built = [b for p in self.providers if (b := self.build_and_check(p, mat, oracle)) is not None]
        for b in built:
            shape_doc["providers"][b.name] = b.impl
        self._progress(advance=1)
        xr = mat.x.detach().clone().requires_grad_(True)
        saved = self.saved_per_provider(built, mat, xr)
        for mode in sorted(self.modes, key=RUN_ORDER.index):
            self.time_mode(mode, built, mat, xr, saved)
        del built, mat, oracle
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def build_and_check(self, p: Provider, mat: Materials, oracle: dict[str, Tensor]) -> Built | None:
        """Provider ``p`` built and checked against the oracle; None when skipped or failed."""
        shape = mat.shape.name
        reason = p.skip_reason(mat.shape, self.device, self.ctx)
        if reason is not None:
            self._skip(shape, p.name, "*", reason)
            return None
        try:
            t_build = time.perf_counter()
            b = p.build(mat, self.ctx)
        except SkipProvider as e:
            self._skip(shape, p.name, "*", str(e))
            return None
        except Exception as e:  # noqa: BLE001 - recorded (--keep-going) or raised by _fail
            self._fail(shape, p.name, f"provider {p.name!r} on shape {shape!r} failed to build: {_short(e)}", e)
            return None
        try:
            t_check = time.perf_counter()
            chk = check_provider(b, mat, oracle, self.modes)
            first_s = time.perf_counter() - t_check
        except Exception as e:  # noqa: BLE001 - a skip, recorded (--keep-going) or raised by _fail
            if b.exception_is_skip:
                self._skip(shape, p.name, "*", f"failed at first call: {_short(e)}")
                return None
            msg = f"provider {p.name!r} on shape {shape!r} raised during the correctness check: {_short(e)}"
            self._fail(shape, p.name, msg, e)
            return None
        ok = all(v <= chk["tol"] for v in chk["errors"].values())
        entry = {
            "shape": shape,
            "provider": p.name,
            "status": ("ok" if ok else "FAIL") if b.adapted else "floor",
            "errors": chk["errors"],
            "max_error": chk["max"],
            "tol": chk["tol"],
            "first_call_s": first_s,
            "build_s": t_check - t_build,
        }
        if not ok:
            entry["message"] = _fail_message(p.name, shape, chk)
        self.result["checks"].append(entry)
        if not ok:
            if not self.cfg.keep_going:
                raise CorrectnessError(entry["message"])
            return None
        if b.exception_is_skip and first_s > 5:
            self.result["notes"].append(f"{p.name} on {shape}: first calls (compilation) took {first_s:.1f} s")
        return b

    def saved_per_provider(self, built: Sequence[Built], mat: Materials, xr: Tensor) -> dict[str, int | None]:
        """Bytes saved for backward by each provider's training forward (training modes only)."""
        if not any(m in TRAINING_MODES for m in self.modes):
            return {}
        exclude = [mat.x, xr] + list(mat.base.parameters())
        return {b.name: None if b.exception_is_skip else provider_saved_bytes(b, xr, exclude + b.params) for b in built}

    def time_mode(
        self, mode: str, built: Sequence[Built], mat: Materials, xr: Tensor, saved: dict[str, int | None]
    ) -> None:
        """Every provider serving ``mode``, timed in interleaved rounds; one row each."""
        shape = mat.shape.name
        self._progress(f"{shape}: {mode}")
        if self._out_of_time():
            for b in built:
                self._skip(shape, b.name, mode, self._time_reason())
            self._progress(advance=1)
            return
        run_b = []
        for b in built:
            if mode in _modes_for(b, self.modes):
                run_b.append(b)
            else:
                self._skip(shape, b.name, mode, b.merged_skip or "mode not supported")
        steps = [Step(b, mode, mat, xr) for b in run_b]
        times = time_steps(steps, Clock(self.device), self.budget, self.deadline)
        base_t = times[[b.name for b in run_b].index("base")]
        for b, ts in zip(run_b, times):
            peak = peak_step_bytes(Step(b, mode, mat, xr), self.device)
            row = self._row(mat.shape, b, mode, ts, base_t, peak, saved.get(b.name) if mode in TRAINING_MODES else None)
            self.result["rows"].append(row)
            if self.on_row:
                self.on_row(row)
        self._progress(advance=1)

    def _row(
        self, shape: Shape, b: Built, mode: str, ts: list[float], base_t: list[float], peak: int | None,
        saved: int | None,
    ) -> dict:
        med, p20, p80 = quantiles(ts)
        r50, r20, r80 = quantiles([t / bt for t, bt in zip(ts, base_t)])
        flops, nbytes = counts.counted(shape, mode, b.adapted)
        check = next(
            (c["status"] for c in self.result["checks"] if c["shape"] == shape.name and c["provider"] == b.name), "n/a"
        )
        return {
            "shape": shape.name,
            "op": shape.op,
            "provider": b.name,
            "impl": b.impl,
            "mode": mode,
            "median_ms": med,
            "p20_ms": p20,
            "p80_ms": p80,
            "reps": len(ts),
            "ratio": r50,
            "ratio_p20": r20,
            "ratio_p80": r80,
            "ratio_of_medians": med / quantiles(base_t)[0],
            "flops": flops,
            "bytes": nbytes,
            "tflops": flops / (med * 1e-3) / 1e12,
            "gbps": nbytes / (med * 1e-3) / 1e9,
            "peak_mib": mib(peak),
            "saved_mib": mib(saved),
            "check": check,
            "dtype": shape.dtype,
        }


def _shape_doc(shape: Shape, mat: Materials, plans: dict[str, dict]) -> dict:
    return {
        "name": shape.name,
        "op": shape.op,
        "description": shape.describe(),
        "note": shape.note,
        "x_shape": list(shape.x_shape),
        "weight_shape": list(shape.weight_shape),
        "ranks": list(shape.ranks),
        "dtype": shape.dtype,
        "channels_last": shape.channels_last,
        "scale": mat.scale,
        "auto_plan": plans,
        "providers": {},
    }


def run(cfg: BenchConfig, on_row: Callable[[dict], None] | None = None) -> dict:
    """Run the benchmark; returns the result document (see ``report`` for its layout).

    Raises ``CorrectnessError`` on the first mismatch unless ``cfg.keep_going``.
    """
    return _Run(cfg, on_row)()


# --------------------------------------------------------------------------------------
# Case builders for the pytest-benchmark suites


@dataclass
class Case:
    """One (shape, provider, mode) ready to time by an external timer (pytest-benchmark):
    call ``setup()`` untimed, then ``run()`` (which synchronizes on CUDA)."""

    shape: Shape
    provider: str
    mode: str
    built: Built
    step: Step
    check: dict = field(default_factory=dict)

    def setup(self) -> None:
        self.step.setup()
        if self.step.mat.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self) -> None:
        self.step.run()
        if self.step.mat.device.type == "cuda":
            torch.cuda.synchronize()


def build_case(shape: Shape, provider: str, mode: str, device: str = "cpu", seed: int = 0, check: bool = True) -> Case:
    """Build one provider for one shape and mode, checked against the reference first.

    Raises ``SkipProvider`` (with the reason) when the provider cannot serve the shape here,
    ``CorrectnessError`` on a mismatch.
    """
    dev = torch.device(device)
    mode = normalize_modes([mode])[0]
    catalog = {p.name: p for p in default_providers()}
    if provider not in catalog:
        raise ValueError(f"unknown provider {provider!r}: expected one of {', '.join(catalog)}")
    p = catalog[provider]
    ctx: dict = {"backends": backends_status(), "explicit": {provider}, "quick": False, "plans": {}}
    reason = p.skip_reason(shape, dev, ctx)
    if reason is not None:
        raise SkipProvider(reason)
    mat = make_materials(shape, dev, seed)
    ctx["plans"][shape.name] = {k: v["strategy"] for k, v in plans_for(mat).items()}
    b = p.build(mat, ctx)
    if mode == "merged" and b.merged_forward is None:
        raise SkipProvider(b.merged_skip or "no merged mode")
    chk: dict = {}
    if check:
        chk = check_provider(b, mat, compute_oracle(mat), [mode])
        if not all(v <= chk["tol"] for v in chk["errors"].values()):
            raise CorrectnessError(_fail_message(provider, shape.name, chk))
    xr = mat.x.detach().clone().requires_grad_(True)
    return Case(shape, provider, mode, b, Step(b, mode, mat, xr), chk)

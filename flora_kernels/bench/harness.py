"""The benchmark harness: providers x modes x shapes, checked against the reference, then timed.

Used by ``flora-bench`` (``flora_kernels.cli``), by the pytest-benchmark suites in ``bench/``
(through ``build_case``) and by ``tests/test_bench_harness.py``.

For each shape:

1. ``Materials``: the frozen base layer, one random non-zero FLoRA adapter, x and dy.
2. The oracle: this project's reference path (FLoRA layer, reference backend) run in float64
   on upcast copies: y, dx and the gradients of core and every factor.
3. Every selected provider is built (or skipped, with the reason) and checked once per mode
   family it will be timed in: training (y, dx and its parameter gradients mapped back to
   FLoRA's core and factors), inference (y), merged inference (y). The figure is the relative
   error ||out - ref|| / ||ref||; a value above the dtype's tolerance (``TOLERANCE``) stops
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

import contextlib
import copy
import fnmatch
import gc
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..layers import FLoRAConv2d, FLoRALinear
from . import counts
from .counts import MODES
from .env import environment, loadavg
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

# Relative-norm tolerance against the float64 reference, per dtype (METHOD: fp32 arithmetic
# lands far under 1e-3, bf16 operands between 1e-3 and 1e-2). Low precision is loose like
# tests/helpers.py (bf16 5e-2): adapter gradients are reductions over every token/pixel, and
# PyTorch's own bf16 CPU ops accumulate them in bf16 (seen: 4.3e-2 on a depthwise U_in grad
# of the reference factorized path). fp32 on CUDA allows TF32.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
TOLERANCE_FP32_CUDA = 2e-3


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    if dtype == torch.float32 and device.type == "cuda":
        return TOLERANCE_FP32_CUDA
    return TOLERANCE[dtype]


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


def rel_err(out: Tensor | None, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf for a missing or non-finite output."""
    if out is None:
        return math.inf
    o = out.detach().to(device=ref.device, dtype=torch.float64)
    if o.shape != ref.shape or not torch.isfinite(o).all():
        return math.inf
    return float((o - ref).norm() / ref.norm().clamp_min(1e-300))


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
    tol = tolerance(mat.shape.torch_dtype, mat.device)
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


@contextlib.contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_steps(steps: Sequence[Step], clock: Clock, budget: Budget, deadline: float | None) -> list[list[float]]:
    """Interleaved rounds (rotating order); per-step lists of milliseconds."""
    n = len(steps)
    times: list[list[float]] = [[] for _ in range(n)]
    with _gc_paused():
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


def quantiles(v: Sequence[float]) -> tuple[float, float, float]:
    a = np.asarray(v, dtype=np.float64)
    p20, p50, p80 = np.percentile(a, [20, 50, 80])
    return float(p50), float(p20), float(p80)


def saved_bytes(b: Built, xr: Tensor, exclude: Iterable[Tensor]) -> int | None:
    """Bytes of the unique storages the training forward saves for backward (params, x excluded)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in skip and st.data_ptr() != 0:
                seen[st.data_ptr()] = st.nbytes()
        except Exception as e:  # noqa: BLE001 - tensor subclasses without storage
            log.debug("saved tensor without a storage: %s", e)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
            y = b.forward(xr)
        del y
    except Exception as e:  # noqa: BLE001
        log.info("saved-bytes measurement failed for %s: %s", b.name, e)
        return None
    _clear(b, xr)
    return sum(seen.values())


def peak_bytes(step: Step, device: torch.device) -> int | None:
    """CUDA only: peak allocated during one run() above what was allocated before it."""
    if device.type != "cuda":
        return None
    step.setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    m0 = torch.cuda.memory_allocated(device)
    step.run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - m0
    step.teardown()
    return int(peak)


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


def run(cfg: BenchConfig, on_row: Callable[[dict], None] | None = None) -> dict:
    """Run the benchmark; returns the result document (see ``report`` for its layout).

    Raises ``CorrectnessError`` on the first mismatch unless ``cfg.keep_going``.
    """
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch.cuda.is_available() is False on this machine")
    modes = normalize_modes(cfg.modes)
    budget = cfg.resolved_budget()
    catalog = default_providers() + list(cfg.extra_providers)
    providers, explicit = select_providers(cfg.providers, catalog)
    t0 = time.perf_counter()
    deadline = t0 + cfg.max_minutes * 60 if cfg.max_minutes else None
    result: dict = {
        "meta": environment(device),
        "config": {
            "device": str(device),
            "quick": cfg.quick,
            "modes": list(modes),
            "seed": cfg.seed,
            "providers": [p.name for p in providers],
            "provider_patterns": list(cfg.providers or []),
            "shapes": [s.name for s in cfg.shapes],
            "budget": asdict(budget),
            "keep_going": cfg.keep_going,
            "max_minutes": cfg.max_minutes,
            "timing": "CUDA events, L2 flushed before each call"
            if device.type == "cuda"
            else "time.perf_counter, gc paused",
            "tolerance": {str(k).replace("torch.", ""): v for k, v in TOLERANCE.items()},
        },
        "backends": backends_status(),
        "shapes": [],
        "checks": [],
        "rows": [],
        "skipped": [],
        "notes": [],
    }
    ctx: dict = {"backends": result["backends"], "explicit": explicit, "quick": cfg.quick, "plans": {}}
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cfg.shapes) * (1 + len(modes)), desc="flora-bench", unit="step", leave=False)

    def skip(shape: str, provider: str, mode: str, reason: str) -> None:
        result["skipped"].append({"shape": shape, "provider": provider, "mode": mode, "reason": reason})

    try:
        for si, shape in enumerate(cfg.shapes):
            if deadline is not None and time.perf_counter() > deadline:
                skip(shape.name, "all providers", "*", f"time budget (--max-minutes {cfg.max_minutes}) exhausted")
                if bar:
                    bar.update(1 + len(modes))
                continue
            if bar:
                bar.set_description(f"{shape.name}: build+check")
            mat = make_materials(shape, device, seed=cfg.seed + si)
            plans = plans_for(mat)
            ctx["plans"][shape.name] = {k: v["strategy"] for k, v in plans.items()}
            oracle = compute_oracle(mat)
            shape_doc = {
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
            result["shapes"].append(shape_doc)
            built: list[Built] = []
            for p in providers:
                reason = p.skip_reason(shape, device, ctx)
                if reason is not None:
                    skip(shape.name, p.name, "*", reason)
                    continue
                try:
                    t_build = time.perf_counter()
                    b = p.build(mat, ctx)
                except SkipProvider as e:
                    skip(shape.name, p.name, "*", str(e))
                    continue
                except Exception as e:
                    msg = f"provider {p.name!r} on shape {shape.name!r} failed to build: {_short(e)}"
                    if cfg.keep_going:
                        result["checks"].append(
                            {"shape": shape.name, "provider": p.name, "status": "FAIL", "message": msg, "errors": {}}
                        )
                        continue
                    raise CorrectnessError(msg) from e
                try:
                    t_check = time.perf_counter()
                    chk = check_provider(b, mat, oracle, modes)
                    first_s = time.perf_counter() - t_check
                except Exception as e:
                    if b.exception_is_skip:
                        skip(shape.name, p.name, "*", f"failed at first call: {_short(e)}")
                        continue
                    msg = (
                        f"provider {p.name!r} on shape {shape.name!r} raised during the correctness check: {_short(e)}"
                    )
                    if cfg.keep_going:
                        result["checks"].append(
                            {"shape": shape.name, "provider": p.name, "status": "FAIL", "message": msg, "errors": {}}
                        )
                        continue
                    raise CorrectnessError(msg) from e
                ok = all(v <= chk["tol"] for v in chk["errors"].values())
                status = ("ok" if ok else "FAIL") if b.adapted else "floor"
                entry = {
                    "shape": shape.name,
                    "provider": p.name,
                    "status": status,
                    "errors": chk["errors"],
                    "max_error": chk["max"],
                    "tol": chk["tol"],
                    "first_call_s": first_s,
                    "build_s": t_check - t_build,
                }
                if not ok:
                    entry["message"] = _fail_message(p.name, shape.name, chk)
                result["checks"].append(entry)
                if not ok:
                    if not cfg.keep_going:
                        raise CorrectnessError(entry["message"])
                    continue
                if b.exception_is_skip and first_s > 5:
                    result["notes"].append(f"{p.name} on {shape.name}: first calls (compilation) took {first_s:.1f} s")
                shape_doc["providers"][p.name] = b.impl
                built.append(b)
            if bar:
                bar.update(1)

            xr = mat.x.detach().clone().requires_grad_(True)
            exclude = [mat.x, xr] + list(mat.base.parameters())
            saved: dict[str, int | None] = {}
            if any(m in TRAINING_MODES for m in modes):
                for b in built:
                    saved[b.name] = None if b.exception_is_skip else saved_bytes(b, xr, exclude + b.params)
            clock = Clock(device)
            base_b = next(b for b in built if b.name == "base")
            for mode in sorted(modes, key=RUN_ORDER.index):
                if bar:
                    bar.set_description(f"{shape.name}: {mode}")
                if deadline is not None and time.perf_counter() > deadline:
                    for b in built:
                        skip(shape.name, b.name, mode, f"time budget (--max-minutes {cfg.max_minutes}) exhausted")
                    if bar:
                        bar.update(1)
                    continue
                run_b = []
                for b in built:
                    if mode in _modes_for(b, modes):
                        run_b.append(b)
                    else:
                        skip(shape.name, b.name, mode, b.merged_skip or "mode not supported")
                steps = [Step(b, mode, mat, xr) for b in run_b]
                times = time_steps(steps, clock, budget, deadline)
                base_t = times[run_b.index(base_b)]
                peaks = {b.name: peak_bytes(Step(b, mode, mat, xr), device) for b in run_b}
                for b, ts in zip(run_b, times):
                    med, p20, p80 = quantiles(ts)
                    ratios = [t / bt for t, bt in zip(ts, base_t)]
                    r50, r20, r80 = quantiles(ratios)
                    flops, nbytes = counts.counted(shape, mode, b.adapted)
                    row = {
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
                        "peak_mib": None if peaks[b.name] is None else peaks[b.name] / 2**20,
                        "saved_mib": (None if saved.get(b.name) is None else saved[b.name] / 2**20)
                        if mode in TRAINING_MODES
                        else None,
                        "check": next(
                            (
                                c["status"]
                                for c in result["checks"]
                                if c["shape"] == shape.name and c["provider"] == b.name
                            ),
                            "n/a",
                        ),
                        "dtype": shape.dtype,
                    }
                    result["rows"].append(row)
                    if on_row:
                        on_row(row)
                if bar:
                    bar.update(1)
            del built, mat, oracle
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except CorrectnessError as e:
        e.result = result  # type: ignore[attr-defined]  # the partial document, for the reports
        raise
    finally:
        if bar:
            bar.close()
        result["meta"]["elapsed_s"] = time.perf_counter() - t0
        result["meta"]["loadavg_end"] = loadavg()
    return result


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

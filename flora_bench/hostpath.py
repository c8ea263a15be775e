"""The host-path case: what an adapted layer adds per call when the math is negligible.

Two stacks of ``layers`` tiny layers, every layer adapted at ``rank``:

- ``linear``: ``layers`` x ``nn.Linear(64, 64)``, x (4, 64);
- ``conv``: ``layers`` x ``nn.Conv2d(16, 16, 3, padding=1)``, x (1, 16, 8, 8).

Providers (``flora_bench.models.build``, the same as the whole-model cases): ``frozen`` (the
stack alone), ``flora-auto`` (backend and strategy auto), ``flora-reference-factorized``, and
``lora`` (PEFT: ``peft.get_peft_model(model, LoraConfig(r=rank, target_modules=[every layer]))``;
skipped with a note where peft does not import: the layer written here would not say what PEFT
costs). Modes: ``infer`` (forward under ``torch.no_grad``) and ``train`` (forward with x
requiring grad, ``backward(dy)``: dx and the adapter gradients, then the gradients set to None as
an optimizer's ``zero_grad`` does).

Timing: 1 torch thread; the calling thread's CPU time (``--clock``); every provider's first calls
of both modes (measured dispatch) and a warm-up round run before timing; then interleaved rounds
(rotating order), each sample ``inner`` calls of the stack. Per round, a provider's extra cost
per adapted layer and call is (its time - the frozen stack's) / (layers * inner); the median over
rounds is reported with 20/80 quantiles, and the ratio of FLoRA's median extra to PEFT LoRA's.

Every FLoRA provider is checked first against the reference path run in float64 (output and
input gradient, ``flora_kernels.testing``'s float64 rule).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .models import ModelCase, _peft_reason, build_cases, check_flora
from .timing import interleaved, quantile

PROVIDERS = ("frozen", "flora-auto", "flora-reference-factorized", "lora")
MODES = ("infer", "train")


@dataclass(frozen=True)
class Stack:
    """``layers`` copies of one tiny layer in an ``nn.Sequential``, and its input's shape."""

    name: str
    layers: int
    make_layer: Callable[[], nn.Module]
    x_shape: tuple[int, ...]
    describe: str

    def build(self, seed: int) -> nn.Sequential:
        torch.manual_seed(seed)
        return nn.Sequential(*[self.make_layer() for _ in range(self.layers)]).requires_grad_(False)


def stacks(layers: int = 48) -> dict[str, Stack]:
    """The two stacks of the case, ``layers`` deep."""
    return {
        "linear": Stack("linear", layers, lambda: nn.Linear(64, 64), (4, 64), f"{layers} x nn.Linear(64, 64), x (4, 64)"),
        "conv": Stack("conv", layers, lambda: nn.Conv2d(16, 16, 3, padding=1), (1, 16, 8, 8),
                      f"{layers} x nn.Conv2d(16, 16, 3, padding=1), x (1, 16, 8, 8)"),
    }


@dataclass(frozen=True)
class HostConfig:
    """What to run: ``stacks`` of ``layers`` layers, ``rounds`` timed rounds of ``inner`` calls."""

    stacks: Sequence[str] = ("linear", "conv")
    layers: int = 48
    rank: int = 8
    rounds: int = 15
    inner: int = 10
    warmup: int = 2
    clock: str = "thread"
    providers: Sequence[str] = PROVIDERS
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.stacks) - {"linear", "conv"}
        if unknown:
            raise ValueError(f"host-path stacks: expected 'linear' and/or 'conv', got {sorted(unknown)}")
        for k in ("layers", "rank", "rounds", "inner"):
            if getattr(self, k) < 1:
                raise ValueError(f"host-path {k}: expected >= 1, got {getattr(self, k)}")


QUICK = HostConfig(rounds=5, inner=5, warmup=1)  # flora-bench --quick: about 10-20 s of CPU time


def _infer(c: ModelCase, x: Tensor, inner: int) -> None:
    with torch.no_grad():
        for _ in range(inner):
            c.model(x)


def _train(c: ModelCase, params: list[Tensor], x: Tensor, dy: Tensor, inner: int) -> None:
    for _ in range(inner):
        c.model(x).backward(dy)
        x.grad = None
        for p in params:
            p.grad = None


def _calls(cases: Sequence[ModelCase], x: Tensor, dy: Tensor, inner: int) -> dict[str, dict[str, Callable[[], None]]]:
    """{mode: {provider: one timed sample}}."""
    xr = x.detach().clone().requires_grad_(True)
    out: dict[str, dict[str, Callable[[], None]]] = {m: {} for m in MODES}
    for c in cases:
        params = [p for p in c.model.parameters() if p.requires_grad]
        out["infer"][c.name] = functools.partial(_infer, c, x, inner)
        out["train"][c.name] = functools.partial(_train, c, params, xr, dy, inner)
    return out


def _rows(stack: Stack, cases: Sequence[ModelCase], mode: str, times: dict[str, list[float]], inner: int) -> list[dict]:
    per_call = stack.layers * inner
    rows = []
    for c in cases:
        ts = times[c.name]
        extra = [(t - f) / per_call * 1e6 for t, f in zip(ts, times["frozen"])]
        rows.append({
            "stack": stack.name, "mode": mode, "provider": c.name, "impl": c.impl,
            "stack_us": quantile(ts, 0.5) / inner * 1e6,
            "extra_us_per_layer": quantile(extra, 0.5), "extra_q20": quantile(extra, 0.2),
            "extra_q80": quantile(extra, 0.8), "samples": len(ts),
        })
    return rows


def _ratios(rows: Sequence[dict]) -> dict[str, float]:
    """FLoRA provider -> its median extra per layer / PEFT LoRA's (same stack and mode)."""
    lora = next((r for r in rows if r["provider"] == "lora"), None)
    if lora is None or lora["extra_us_per_layer"] <= 0:
        return {}
    return {r["provider"]: r["extra_us_per_layer"] / lora["extra_us_per_layer"]
            for r in rows if r["provider"].startswith("flora")}


def run_stack(stack: Stack, cfg: HostConfig, log: Callable[[str], None] | None = None) -> dict:
    """One stack: providers built, FLoRA checked, first calls made, then both modes timed."""
    base = stack.build(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(stack.x_shape, generator=g)
    with torch.no_grad():
        dy = torch.randn(base(x).shape, generator=g)
    names = [p for p in cfg.providers if p != "lora" or _peft_reason() is None]
    cases, skipped = build_cases(names, base, cfg.rank, cfg.seed)
    if "lora" in cfg.providers and "lora" not in names:
        skipped["lora"] = f"PEFT LoRA: {_peft_reason()} (pip install peft)"
    checks = check_flora(f"host-path {stack.name}", cases, base, cfg.rank, cfg.seed, x, dy)
    calls = _calls(cases, x, dy, cfg.inner)
    for per_mode in calls.values():  # first calls: measured dispatch decides here, before any timing
        for fn in per_mode.values():
            fn()
    doc = {"stack": stack.name, "describe": stack.describe, "layers": stack.layers, "rank": cfg.rank,
           "rows": [], "ratio_to_peft": {}, "checks": checks, "skipped": skipped}
    for mode in MODES:
        times = interleaved(calls[mode], cfg.rounds, cfg.clock, cfg.warmup)
        rows = _rows(stack, cases, mode, times, cfg.inner)
        doc["rows"] += rows
        doc["ratio_to_peft"][mode] = _ratios(rows)
        if log:
            log(f"host-path {stack.name} {mode}: " + ", ".join(
                f"{r['provider']} +{r['extra_us_per_layer']:.2f} us/layer" for r in rows if r["provider"] != "frozen"))
    return doc


def run(cfg: HostConfig = HostConfig(), log: Callable[[str], None] | None = None) -> dict:
    """The host-path case on one torch thread (restored after); returns its result document."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        all_stacks = stacks(cfg.layers)
        results = [run_stack(all_stacks[s], cfg, log) for s in cfg.stacks]
    finally:
        torch.set_num_threads(threads)
    return {"case": "host-path", "config": {k: (list(v) if isinstance(v, tuple) else v)
                                            for k, v in cfg.__dict__.items()},
            "threads": 1, "stacks": results}


def markdown(doc: dict) -> str:
    """The host-path result as Markdown: per stack and mode, each provider's extra per layer."""
    c = doc["config"]
    lines = [(f"### Host path: extra cost per adapted layer and call (rank {c['rank']}, 1 torch thread, "
             f"{c['clock']} CPU time, median of {c['rounds']} interleaved rounds of {c['inner']} calls)"), ""]
    for st in doc["stacks"]:
        lines += [f"{st['describe']}, every layer adapted.", "",
                  "| mode | provider | stack us/call | extra us per layer | q20-q80 | FLoRA extra / PEFT extra |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in st["rows"]:
            ratio = st["ratio_to_peft"].get(r["mode"], {}).get(r["provider"])
            lines.append(f"| {r['mode']} | {r['provider']} | {r['stack_us']:.0f} | {r['extra_us_per_layer']:.2f} | "
                         f"{r['extra_q20']:.2f}-{r['extra_q80']:.2f} | {'' if ratio is None else f'{ratio:.2f}x'} |")
        for n, why in st["skipped"].items():
            lines.append(f"| | {n} | skipped: {why} | | | |")
        if st["checks"]:
            lines.append("")
            lines.append("Checked against the float64 reference path (output, dx): " + ", ".join(
                f"{n} {e:.1e}" for n, e in st["checks"].items()))
        lines.append("")
    return "\n".join(lines)

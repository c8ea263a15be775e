"""The compile-time case (``flora-bench --compile``): what an adapter adds to torch.compile's
first training step, per transformer block.

Model: transformers ``LlamaForCausalLM`` from a tiny config (hidden 64, 4 heads, intermediate 128,
vocab 128, ``blocks`` decoder layers; batch 2, sequence 32), at each block count of ``blocks``
(default 8 and 16). Providers (``flora_bench.models.build``): ``frozen``, ``lora`` (PEFT LoRA),
``flora-auto``; the adapters on q/k/v/o_proj and gate/up/down_proj at ``rank``.

Per provider and block count, cold (``torch._dynamo.reset()`` before each): one eager training
step first (measured dispatch decides there, outside the compile figure), then
``torch.compile(model, backend="aot_eager")`` and its first training step
(``model(inputs_embeds=e, labels=ids).loss.backward()``, ``e`` requiring grad so that the frozen
model has a backward too), timed by the process's CPU time and wall time; then two more steps.
Counters (``torch._dynamo.utils.counters``): graph breaks (with their reasons) during the first
step, and recompiles: frames compiled during the two later steps (0 when the first step's graphs
serve them). ``rounds`` repeats every (block count, provider) cold compile, in an order rotated
per round; a row's times are the median over rounds (the samples are kept): one cold compile
varies by up to 2x on a shared 2-core VM. Reported: per provider the first-step time per extra
block, (t(blocks[-1]) - t(blocks[0])) / (blocks[-1] - blocks[0]), and the same minus the frozen
model's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .models import build_cases

PROVIDERS = ("frozen", "lora", "flora-auto")


def tiny_llama(blocks: int, seed: int = 0) -> nn.Module:
    """The case's LlamaForCausalLM (random init, frozen, eval mode)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=blocks, num_attention_heads=4,
                                   num_key_value_heads=4, intermediate_size=128, vocab_size=128,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval().requires_grad_(False)


def _inputs(base: nn.Module, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, base.config.vocab_size, (2, 32), generator=g)
    with torch.no_grad():
        emb = base.get_input_embeddings()(ids)
    return ids, emb.requires_grad_(True)


def _step(model: nn.Module, ids: Tensor, emb: Tensor) -> None:
    model(inputs_embeds=emb, labels=ids).loss.backward()
    for p in model.parameters():
        p.grad = None
    emb.grad = None


def _graph_breaks() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def _frames() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


def first_step(model: nn.Module, ids: Tensor, emb: Tensor) -> dict:
    """Cold torch.compile(backend="aot_eager") of ``model``: first step's times and counters."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    _step(model, ids, emb)  # eager: measured dispatch decides here
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    c0, w0 = time.process_time(), time.perf_counter()
    _step(compiled, ids, emb)
    cpu_s, wall_s = time.process_time() - c0, time.perf_counter() - w0
    breaks = _graph_breaks()
    frames = _frames()
    for _ in range(2):
        _step(compiled, ids, emb)
    return {"first_step_cpu_s": cpu_s, "first_step_wall_s": wall_s, "graph_breaks": sum(breaks.values()),
            "graph_break_reasons": dict(sorted(breaks.items(), key=lambda kv: -kv[1])[:5]),
            "frames_first_step": frames, "recompiles": _frames() - frames}


def _per_block(rows: Sequence[dict], blocks: Sequence[int]) -> dict[str, dict[str, float]]:
    """Per provider: first-step seconds per extra block (CPU), and over the frozen model's."""
    lo, hi = min(blocks), max(blocks)
    if lo == hi:
        return {}
    t = {(r["provider"], r["blocks"]): r["first_step_cpu_s"] for r in rows}
    out = {}
    for p in dict.fromkeys(r["provider"] for r in rows):
        if (p, lo) in t and (p, hi) in t:
            out[p] = {"cpu_s_per_block": (t[p, hi] - t[p, lo]) / (hi - lo)}
    if "frozen" in out:
        for v in out.values():
            v["extra_cpu_s_per_block"] = v["cpu_s_per_block"] - out["frozen"]["cpu_s_per_block"]
        lora = out.get("lora", {}).get("extra_cpu_s_per_block")
        for p, v in out.items():
            if p.startswith("flora") and lora is not None and lora > 0:
                v["extra_over_lora_extra"] = v["extra_cpu_s_per_block"] / lora
    return out


def run(blocks: Sequence[int] = (8, 16), providers: Sequence[str] = PROVIDERS, rank: int = 8, seed: int = 0,
        log: Callable[[str], None] | None = None, rounds: int = 1) -> dict:
    """The compile case; returns its result document."""
    if not blocks or any(b < 1 for b in blocks):
        raise ValueError(f"compile blocks: expected positive block counts, got {list(blocks)}")
    if rounds < 1:
        raise ValueError(f"compile rounds: expected an int >= 1, got {rounds}")
    samples: dict[tuple[str, int], list[dict]] = {}
    impls, skipped = {}, {}
    for k in range(rounds):
        for n in blocks:
            base = tiny_llama(n, seed)
            ids, emb = _inputs(base, seed)
            cases, sk = build_cases(providers, base, rank, seed, targets="linear")
            skipped.update(sk)
            for c in cases[k % len(cases):] + cases[:k % len(cases)]:
                r = first_step(c.model, ids, emb)
                samples.setdefault((c.name, n), []).append(r)
                impls[c.name] = c.impl
                if log:
                    log(f"compile {n} blocks {c.name} (round {k + 1}/{rounds}): first step {r['first_step_cpu_s']:.1f} s "
                        f"CPU, {r['graph_breaks']} graph breaks, {r['recompiles']} recompiles")
    rows = []
    for (name, n), rs in sorted(samples.items(), key=lambda kv: (kv[0][1], list(impls).index(kv[0][0]))):
        cpu = [r["first_step_cpu_s"] for r in rs]
        rows.append({"provider": name, "impl": impls[name], "blocks": n, "first_step_cpu_s": statistics.median(cpu),
                     "first_step_cpu_s_samples": cpu,
                     "first_step_wall_s": statistics.median(r["first_step_wall_s"] for r in rs),
                     "graph_breaks": max(r["graph_breaks"] for r in rs),
                     "graph_break_reasons": rs[0]["graph_break_reasons"],
                     "frames_first_step": rs[0]["frames_first_step"], "recompiles": max(r["recompiles"] for r in rs)})
    import torch._dynamo

    torch._dynamo.reset()
    return {"case": "compile", "backend": "aot_eager", "rank": rank, "blocks": list(blocks), "rounds": rounds,
            "rows": rows, "per_block": _per_block(rows, blocks), "skipped": skipped}


def markdown(doc: dict) -> str:
    """First-step times, graph breaks and recompiles, and the per-block figures."""
    lines = [(f"### torch.compile(backend=\"{doc['backend']}\"), first training step of a tiny Llama (hidden 64, "
              f"4 heads, intermediate 128, vocab 128), rank {doc['rank']} on q/k/v/o/gate/up/down"), "",
             f"Median of {doc.get('rounds', 1)} cold compile(s) per row (rotated order); the CPU samples beside it.", "",
             "| provider | blocks | first step CPU s | samples | wall s | graph breaks | recompiles |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for r in doc["rows"]:
        samples = ", ".join(f"{t:.1f}" for t in r.get("first_step_cpu_s_samples", [r["first_step_cpu_s"]]))
        lines.append(f"| {r['provider']} | {r['blocks']} | {r['first_step_cpu_s']:.1f} | {samples} "
                     f"| {r['first_step_wall_s']:.1f} | {r['graph_breaks']} | {r['recompiles']} |")
    for n, why in doc["skipped"].items():
        lines.append(f"| {n} | skipped: {why} | | | | | |")
    if doc["per_block"]:
        lines += ["", "| provider | first-step CPU s per extra block | over frozen | / PEFT's over frozen |",
                  "|---|---:|---:|---:|"]
        for p, v in doc["per_block"].items():
            extra, ratio = v.get("extra_cpu_s_per_block"), v.get("extra_over_lora_extra")
            lines.append(f"| {p} | {v['cpu_s_per_block']:.2f} | {'' if extra is None else f'{extra:.2f}'} "
                         f"| {'' if ratio is None else f'{ratio:.2f}x'} |")
    reasons = {r["provider"]: r["graph_break_reasons"] for r in doc["rows"] if r["graph_break_reasons"]}
    for p, rs in reasons.items():
        lines.append(f"- {p} graph breaks: " + "; ".join(f"{k} (x{v})" for k, v in rs.items()))
    lines.append("")
    return "\n".join(lines)

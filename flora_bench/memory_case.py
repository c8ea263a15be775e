"""The memory case (``flora-bench --memory``): what one training step keeps for backward.

Models (random init, from configs; no download):

- ``llama``: transformers ``LlamaForCausalLM``, hidden 256, 4 layers, 4 heads, intermediate 688,
  vocab 1000; batch 2, sequence 256; every Linear adapted but the output head ("all-linear").
  The step: ``model(inputs_embeds=e, labels=ids).loss.backward()`` with ``e`` (the input
  embeddings, computed once) requiring grad, so that the frozen model has a backward too.
- ``resnet18``: timm's, batch 8, 96x96, every conv and Linear adapted.
- ``vit_tiny``: timm's vit_tiny_patch16_224, batch 8, 224x224, every Linear adapted.
  (Vision steps: ``model(x).backward(dy)``, x requiring grad.)

Providers (``flora_bench.models.build``): ``frozen`` (forward + dx only), ``full`` (full
fine-tuning), ``lora`` (PEFT LoRA, r = rank, on the same modules where peft supports them),
``flora-auto``, ``flora-factorized``, ``flora-merged``, and ``flora-lean`` where
``fk.FLoRAConfig`` has a lean-memory option (skipped with the reason otherwise). More providers:
any name ``models.build`` knows.

Figures per provider, after one warm-up step (measured dispatch decides there):

- ``saved_mib``: the tensors autograd saves for backward in one step's forward
  (``saved_tensors_hooks``), each storage counted once, the model's parameters left out (the
  input is counted: it is the same in every provider);
- ``peak_mib``: the device's peak during one step above what was allocated before it
  (``torch.cuda.max_memory_allocated``; "n/a" on a CPU);
- ``vs_frozen``: saved_mib / the frozen model's;
- ``dispatch`` (FLoRA providers): what the adapted calls of one step ran (backend/strategy [source]).

No timing, hence no correctness check here (the layer, model and host-path cases check theirs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .memory import fmt_mib, mib, peak_bytes, saved_bytes
from .models import build_cases, dispatch_counts, make_model

MODELS = ("llama", "resnet18", "vit_tiny")
PROVIDERS = ("frozen", "full", "lora", "flora-auto", "flora-factorized", "flora-merged", "flora-lean")


@dataclass
class Workload:
    """A base model and its training step: ``forward(model)`` -> the tensor ``backward`` starts
    from (with ``grad`` as its gradient; None for a scalar loss); ``inputs``: the tensors that
    require grad (their gradients are cleared after each step)."""

    name: str
    base: nn.Module
    src: str
    targets: str
    describe: str
    forward: Callable[[nn.Module], Tensor]
    grad: Tensor | None
    inputs: list[Tensor]

    def step(self, model: nn.Module) -> None:
        self.forward(model).backward(self.grad)
        for p in model.parameters():
            p.grad = None
        for t in self.inputs:
            t.grad = None


def _llama(device: torch.device, seed: int) -> Workload:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                   intermediate_size=688, vocab_size=1000, max_position_embeddings=512)
    base = transformers.LlamaForCausalLM(cfg).eval().requires_grad_(False).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (2, 256), generator=g).to(device)
    with torch.no_grad():
        emb = base.get_input_embeddings()(ids)
    emb.requires_grad_(True)
    return Workload("llama", base, f"transformers {transformers.__version__} LlamaForCausalLM", "linear",
                    "tiny Llama (hidden 256, 4 layers, 4 heads, intermediate 688, vocab 1000), batch 2, seq 256, "
                    "all-linear", lambda m: m(inputs_embeds=emb, labels=ids).loss, None, [emb])


def _vision(name: str, batch: int, size: int, targets: str, device: torch.device, seed: int) -> Workload:
    torch.manual_seed(seed)
    base, src = make_model(name, size)
    base = base.requires_grad_(False).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, size, size, generator=g).to(device).requires_grad_(True)
    with torch.no_grad():
        dy = torch.randn(base(x).shape, generator=g).to(device)
    what = "every conv and Linear" if targets == "all" else "every Linear"
    return Workload(name, base, src, targets, f"{name}, batch {batch}, {size}x{size}, {what}", lambda m: m(x), dy, [x])


def workload(name: str, device: torch.device | str = "cpu", seed: int = 0, small: bool = False) -> Workload:
    """Model ``name`` with its inputs; ``small``: tiny batch and resolution (tests)."""
    device = torch.device(device)
    if name == "llama":
        return _llama(device, seed)
    if name == "resnet18":
        return _vision(name, 1 if small else 8, 32 if small else 96, "all", device, seed)
    if name == "vit_tiny":
        return _vision(name, 1 if small else 8, 32 if small else 224, "linear", device, seed)
    raise ValueError(f"memory model: expected one of {MODELS}, got {name!r}")


def measure(w: Workload, providers: Sequence[str] = PROVIDERS, rank: int = 8, seed: int = 0,
            log: Callable[[str], None] | None = None) -> dict:
    """Every provider's saved-for-backward bytes and peak for one step of ``w``."""
    cases, skipped = build_cases(providers, w.base, rank, seed, w.targets)
    rows = []
    for c in cases:
        model = c.model
        w.step(model)  # warm-up: measured dispatch decides here
        saved = saved_bytes(functools.partial(w.forward, model), list(model.parameters()))
        peak = peak_bytes(functools.partial(w.step, model), w.inputs[0].device)
        row = {"provider": c.name, "impl": c.impl, "saved_mib": mib(saved), "peak_mib": mib(peak)}
        if c.name.startswith("flora"):
            row["dispatch"] = dispatch_counts(model, functools.partial(w.step, model))
        rows.append(row)
        if log:
            log(f"memory {w.name} {c.name}: saved {saved / 2**20:.1f} MiB, peak {fmt_mib(mib(peak))}")
    frozen = next((r["saved_mib"] for r in rows if r["provider"] == "frozen"), None)
    for r in rows:
        r["vs_frozen"] = None if not frozen else r["saved_mib"] / frozen
    return {"model": w.name, "impl": w.src, "describe": w.describe, "rank": rank, "rows": rows, "skipped": skipped}


def run(models: Sequence[str] = MODELS, providers: Sequence[str] = PROVIDERS, rank: int = 8, device: str = "cpu",
        seed: int = 0, small: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """The memory case over ``models``; returns its result document."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"memory models: expected some of {MODELS}, got {unknown}")
    return {"case": "memory", "device": device, "rank": rank,
            "models": [measure(workload(m, device, seed, small), providers, rank, seed, log) for m in models]}


def markdown(doc: dict) -> str:
    """Saved-for-backward and peak MiB per model and provider."""
    lines = [(f"### Memory of one training step (rank {doc['rank']}, fp32, {doc['device']}): tensors saved for "
             "backward (each storage once, parameters excluded) and the device's peak"), ""]
    for m in doc["models"]:
        lines += [f"{m['describe']} ({m['impl']}).", "",
                  "| provider | saved for backward MiB | / frozen | peak MiB |", "|---|---:|---:|---:|"]
        for r in m["rows"]:
            vs = "" if r["vs_frozen"] is None else f"{r['vs_frozen']:.2f}x"
            lines.append(f"| {r['provider']} | {r['saved_mib']:.1f} | {vs} | {fmt_mib(r['peak_mib'])} |")
        for n, why in m["skipped"].items():
            lines.append(f"| {n} | skipped: {why} | | |")
        lines.append("")
        for r in m["rows"]:
            if r.get("dispatch"):
                lines.append(f"- {r['provider']} ran: " + ", ".join(f"{k} x{v}" for k, v in sorted(r["dispatch"].items())))
        lines.append("")
    return "\n".join(lines)

"""QLoRA-style FLoRA on CPU: a tiny Llama with 4-bit (nf4) frozen Linear layers.

1. Build a ``transformers`` LlamaForCausalLM from its config (random weights, no download):
   hidden 256, 4 layers, 4 heads, MLP 512, vocabulary 512.
2. Replace every Linear inside the decoder layers by a bitsandbytes ``Linear4bit`` (nf4, double
   quantization), as QLoRA does; the embeddings, norms and the LM head stay unquantized.
3. ``fk.prepare_model_for_kbit_training`` (freeze, fp32 norms, gradient checkpointing), then
   ``fk.inject_flora`` on every Linear ("all-linear": the 28 quantized projections).
4. Train the adapters for some steps on a synthetic language (a sparse random Markov chain:
   each token has 4 successors among 16 frequent tokens) and check that the loss falls and
   that the quantized bytes of the base are bit-identical before and after.
5. Do the same with the fp32 model (the same recipe, nothing quantized) and print both side by
   side: the loss, the bytes of the base weights (state_dict, quantization statistics
   included), the adapter bytes, the peak resident memory while training and how much of it
   the training added to what was resident when it started (each variant in its own process,
   both with the same libraries imported; on Linux the peak is reset after the model is built).

Run:

    python examples/qlora_llama.py            # 60 steps per variant, about 10 s of CPU time each (1 thread)
    python examples/qlora_llama.py --quick    # a few seconds (what tests/quant/test_qlora_example.py runs)
"""

from __future__ import annotations

import argparse
import gc
import math
import multiprocessing as mp
import os
import re
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import flora_kernels as fk
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import flora_kernels as fk
from flora_kernels.layers import flora_layers


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (more made a busy machine slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-checkpointing", action="store_true", help="train without gradient checkpointing")
    p.add_argument("--no-fp32", action="store_true", help="skip the fp32 comparison run")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 layer of hidden 64, 3 steps, 16 tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.steps, args.seq, args.batch = 64, 1, 3, 16, 2
    return args


# ------------------------------------------------------------------------------------ model


def build_model(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=max(256, args.seq), tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def quantize_decoder_linears(model: nn.Module) -> int:
    """Replace every nn.Linear inside the decoder layers by an nf4 ``Linear4bit`` (double
    quantization, fp32 compute), in place. Returns how many were replaced."""
    import bitsandbytes as bnb

    names = [n for n, m in model.model.layers.named_modules() if type(m) is nn.Linear]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.model.layers.get_submodule(parent_name)
        lin = getattr(parent, child)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        q.load_state_dict(lin.state_dict())
        setattr(parent, child, q.to(lin.weight.device))  # .to() quantizes
        del lin
    gc.collect()
    return len(names)


def base_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict without the adapters (quantization statistics included)."""
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if ".flora_" not in k)


def adapter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".flora_" in n)


def quantized_bytes(model: nn.Module) -> dict[str, Tensor]:
    """Copies of every quantized layer's packed weight and statistics."""
    from flora_kernels.layers.quantized import quant_scheme

    out = {}
    for name, m in model.named_modules():
        scheme = quant_scheme(m)
        if scheme is not None:
            out.update({f"{name}.{k}": v.detach().clone() for k, v in scheme.packed_tensors(m).items()})
    return out


# ------------------------------------------------------------------------------------ data


def markov_batches(args: argparse.Namespace, steps: int) -> list[Tensor]:
    """Token batches (batch, seq) from a fixed sparse Markov chain: the first token is uniform
    over the vocabulary, each token has 4 equally likely successors among the first 16 tokens
    (so the loss can fall from log(vocab) to log(16) by frequency, then to log(4))."""
    g = torch.Generator().manual_seed(1234)
    successors = torch.randint(0, min(16, args.vocab), (args.vocab, 4), generator=g)
    batches = []
    for _ in range(steps):
        tok = torch.randint(0, args.vocab, (args.batch,), generator=g)
        seq = [tok]
        for _ in range(args.seq - 1):
            tok = successors[tok, torch.randint(0, 4, (args.batch,), generator=g)]
            seq.append(tok)
        batches.append(torch.stack(seq, 1))
    return batches


# ------------------------------------------------------------------------------------ memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"{field}:\s+(\d+) kB", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def reset_peak_rss() -> bool:
    """Reset the peak resident set size (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# ------------------------------------------------------------------------------------ training


def train(args: argparse.Namespace, quantize: bool) -> dict[str, Any]:
    """Build, prepare, inject and train one variant; returns its losses and measurements."""
    torch.set_num_threads(args.threads)
    model = build_model(args)
    n_quantized = quantize_decoder_linears(model) if quantize else 0
    model = fk.prepare_model_for_kbit_training(model, use_gradient_checkpointing=not args.no_checkpointing)
    fk.inject_flora(model, fk.FLoRAConfig(rank=args.rank, target_modules="all-linear"))
    model.train()
    before = quantized_bytes(model)
    batches = markov_batches(args, args.steps)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gc.collect()
    reset = reset_peak_rss()
    start_rss = (_status_kb("VmRSS") or 0) / 1024
    losses = []
    t0 = time.process_time()
    for ids in batches:
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.process_time() - t0
    after = quantized_bytes(model)
    identical = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return {
        "variant": "nf4 + FLoRA" if quantize else "fp32 + FLoRA",
        "quantized_layers": n_quantized,
        "adapted_layers": len(flora_layers(model)),
        "losses": losses,
        "base_bytes": base_bytes(model),
        "adapter_bytes": adapter_bytes(model),
        "trainable": sum(p.numel() for p in params),
        "start_rss_mib": start_rss,
        "peak_rss_mib": peak_rss_mib(),
        "peak_is_training_only": reset,
        "cpu_seconds": seconds,
        "quantized_bytes_identical": identical if quantize else None,
    }


def _child(args: argparse.Namespace, quantize: bool, queue: Any) -> None:
    try:
        queue.put(train(args, quantize))
    except BaseException as e:  # report it to the parent instead of hanging it
        queue.put({"error": f"{type(e).__name__}: {e}"})
        raise


def run_isolated(args: argparse.Namespace, quantize: bool) -> dict[str, Any]:
    """``train`` in a fresh process, so that each variant's peak memory is its own."""
    # fork where there is one: the child starts from this process's imports (the parent has run no
    # parallel torch op yet, so forking is safe)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(args, quantize, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"the {'nf4' if quantize else 'fp32'} run failed: {result['error']}")
    return result


def report(results: list[dict[str, Any]], vocab: int) -> str:
    mib = 1024 * 1024
    lines = [
        (
            f"{'variant':<14} {'loss first -> last':>20} {'base weights':>13} {'adapters':>10} {'peak RSS':>10} "
            f"{'of which training':>18} {'CPU s':>7}"
        ),
        "-" * 80,
    ]
    for r in results:
        lines.append(
            f"{r['variant']:<14} {r['losses'][0]:>9.3f} -> {r['losses'][-1]:<7.3f} {r['base_bytes'] / mib:>9.2f} MiB "
            f"{r['adapter_bytes'] / mib:>6.2f} MiB {r['peak_rss_mib']:>6.0f} MiB "
            f"{r['peak_rss_mib'] - r['start_rss_mib']:>14.1f} MiB {r['cpu_seconds']:>7.1f}"
        )
    q = results[0]
    lines.append(
        f"nf4: {q['quantized_layers']} quantized Linear layers, {q['adapted_layers']} adapted, "
        f"{q['trainable']:,} trainable parameters; quantized bytes bit-identical after training: "
        f"{q['quantized_bytes_identical']}"
    )
    if len(results) > 1:
        f = results[1]
        lines.append(
            f"base weights nf4 / fp32: {q['base_bytes'] / f['base_bytes']:.3f}; peak RSS nf4 / fp32: "
            f"{q['peak_rss_mib'] / f['peak_rss_mib']:.3f}"
            + ("" if q["peak_is_training_only"] else " (process peak: the import is included)")
        )
    lines.append(
        f"log(vocab) = {math.log(vocab):.3f} (a uniform guess), log(16) = {math.log(16):.3f} (the frequent tokens), "
        f"log(4) = {math.log(4):.3f} (the chain's floor)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, isolate: bool = True) -> dict[str, Any]:
    """Run the example; ``isolate=False`` runs the variants in this process (the tests' choice)."""
    args = parse_args(argv)
    variants = [True] if args.no_fp32 else [True, False]
    import bitsandbytes  # noqa: F401  (before the variants start: both processes hold the same libraries)
    run = run_isolated if isolate else train
    results = [run(args, q) for q in variants]
    print(report(results, args.vocab))
    return {"results": results}


if __name__ == "__main__":
    main()

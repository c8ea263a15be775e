"""Tensors saved for backward with ``FLoRAConfig(lean_memory=True)`` against the frozen model,
FLoRA's default and PEFT LoRA (docs/memory.md), and the gradient error of the lean option.

Models (random init, every Linear adapted, rank 8):
  vit_tiny: timm ``vit_tiny_patch16_224``, batch 8, 224x224 images (x requires grad);
  llama:    transformers LlamaForCausalLM, hidden 256, 4 layers, MLP 512, vocabulary 512,
            batch 2, sequence 256, "all-linear" (the LM head stays frozen), input embeddings
            require grad.

Saved bytes: one training forward under ``torch.autograd.graph.saved_tensors_hooks``; every
storage counted once; parameters, buffers and the model input excluded. The frozen model is
measured with its input requiring grad (forward + dx: what backprop through it keeps).

Gradient error: the same adapter values (non-zero core) in the default and the lean model;
the relative error of the lean model's gradients of the tensors it trains (core, U_out) against
the default's, after the same loss.

Run:  python bench/lean_memory.py [--models vit_tiny llama] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

try:
    import flora_kernels as fk
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import flora_kernels as fk
from flora_kernels.layers import flora_layers
from flora_kernels.testing import rel_err

RANK = 8


def saved_storage_bytes(forward: Callable[[], Tensor], exclude: Iterable[Tensor]) -> int:
    """Bytes of the unique storages ``forward()`` saves for backward, ``exclude``'s storages left out."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr != 0:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
        out = forward()
    del out
    return sum(seen.values())


def vit_tiny() -> tuple[nn.Module, Callable[[nn.Module], Tensor], str]:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    x = torch.randn(8, 3, 224, 224, requires_grad=True)
    return model, lambda m: m(x), "all-linear"


def llama() -> tuple[nn.Module, Callable[[nn.Module], Tensor], str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    emb = torch.randn(2, 256, 256, requires_grad=True)
    return model, lambda m: m(inputs_embeds=emb, use_cache=False).logits, "all-linear"


MODELS = {"vit_tiny": vit_tiny, "llama": llama}


def _randomize(model: nn.Module) -> None:
    """A non-zero core (the paper's init has G = 0, which makes U_out's gradient 0)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in flora_layers(model):
            layer.core.copy_(torch.randn(layer.core.shape, generator=g) * 0.1)


def _peft_lora(model: nn.Module, targets: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=RANK, target_modules=targets))


def measure(name: str) -> dict[str, float]:
    base, forward, targets = MODELS[name]()
    for p in base.parameters():
        p.requires_grad_(False)
    variants: dict[str, nn.Module] = {"frozen": base}
    for label, lean in (("FLoRA", False), ("FLoRA lean", True)):
        variants[label] = fk.inject_flora(
            copy.deepcopy(base), fk.FLoRAConfig(rank=RANK, target_modules=targets, lean_memory=lean)
        )
    _randomize(variants["FLoRA"])
    with torch.no_grad():  # the same adapter values in both
        lean_params = dict(variants["FLoRA lean"].named_parameters())
        for n, p in variants["FLoRA"].named_parameters():
            if ".flora_" in n:
                lean_params[n].copy_(p)
    try:
        variants["PEFT LoRA"] = _peft_lora(copy.deepcopy(base), targets)
    except ImportError as e:
        print(f"PEFT LoRA skipped: {e}")
    out = {}
    for label, m in variants.items():
        exclude = [*m.parameters(), *m.buffers()]
        out[label] = saved_storage_bytes(lambda m=m: forward(m), exclude)
    # gradient error of the lean model's trained tensors against the default's
    grads = {}
    for label in ("FLoRA", "FLoRA lean"):
        m = variants[label]
        m.zero_grad(set_to_none=True)
        forward(m).float().square().mean().backward()
        grads[label] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    trained = grads["FLoRA lean"]
    out["grad_err"] = max(rel_err(trained[n], grads["FLoRA"][n]) for n in trained)
    out["trained_lean"] = float(sum(p.numel() for p in variants["FLoRA lean"].parameters() if p.requires_grad))
    out["trained_default"] = float(sum(p.numel() for p in variants["FLoRA"].parameters() if p.requires_grad))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mib = 1024 * 1024
    for name in args.models:
        r = measure(name)
        frozen = r["frozen"]
        print(f"\n{name}: tensors saved for backward (MiB, and / frozen)")
        for label in ("frozen", "FLoRA", "FLoRA lean", "PEFT LoRA"):
            if label in r:
                print(f"  {label:<11} {r[label] / mib:9.2f}  {r[label] / frozen:6.3f}x")
        print(f"  lean: trained parameters {int(r['trained_lean']):,} of FLoRA's {int(r['trained_default']):,}; "
              f"max relative gradient error of the trained tensors vs the default path: {r['grad_err']:.2e}")


if __name__ == "__main__":
    main()

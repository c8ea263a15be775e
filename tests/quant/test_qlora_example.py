"""fk.prepare_model_for_kbit_training and a shortened run of examples/qlora_llama.py."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from quant_common import make_base
from torch import nn

import flora_kernels as fk

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "qlora_llama.py")


def test_prepare_model_for_kbit_training_casts_and_freezes():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    layer = model.model.layers[0].self_attn
    layer.q_proj = make_base("bnb-nf4").__class__(64, 64, bias=False, compute_dtype=torch.float32,
                                                  quant_type="nf4").to("cpu")
    packed = layer.q_proj.weight.data.clone()
    fk.prepare_model_for_kbit_training(model)
    assert model.model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
    assert layer.q_proj.weight.dtype == torch.uint8 and torch.equal(layer.q_proj.weight.data, packed)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing
    ids = torch.randint(0, 64, (1, 5))
    assert model.get_input_embeddings()(ids).requires_grad  # checkpointed blocks see a grad-requiring input


def test_prepare_model_for_kbit_training_needs_a_checkpointing_model():
    model = nn.Sequential(nn.Linear(4, 4).to(torch.bfloat16))
    with pytest.raises(TypeError, match="gradient_checkpointing_enable"):
        fk.prepare_model_for_kbit_training(model)
    assert model[0].weight.dtype == torch.bfloat16 and model[0].weight.requires_grad  # untouched
    fk.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert model[0].weight.dtype == torch.float32 and not model[0].weight.requires_grad


def test_qlora_example_quick(capsys):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("qlora_llama", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        out = mod.main(["--quick", "--threads", "1"], isolate=False)
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    nf4, fp32 = out["results"]
    assert nf4["variant"].startswith("nf4") and fp32["variant"].startswith("fp32")
    assert nf4["quantized_bytes_identical"] is True
    assert nf4["quantized_layers"] == nf4["adapted_layers"] == 7  # q, k, v, o, gate, up, down of one layer
    assert nf4["base_bytes"] < fp32["base_bytes"] and nf4["adapter_bytes"] == fp32["adapter_bytes"]
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (nf4, fp32))
    assert "quantized bytes bit-identical after training: True" in text and "peak RSS" in text

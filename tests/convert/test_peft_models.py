"""PEFT LoRA import/export on real models built from tiny configs (random weights, no download).

- GPT-2 (transformers ``Conv1D``, PEFT's ``fan_in_fan_out``): a LoRA made by peft imports
  exactly; FLoRA adapters on Conv1D export and load back in peft.
- torchvision's VisionTransformer (``nn.MultiheadAttention``, which PEFT adapts on in_proj and
  out_proj): import, and export -> ``PeftModel.from_pretrained`` gives the same outputs.
- Wav2Vec2Model, whose ``get_input_embeddings`` raises NotImplementedError: the import works.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import flora_kernels as fk
from flora_kernels.convert.peft import export_peft, import_peft, to_peft
from flora_kernels.layers import flora_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = RTOL = 2e-5


def peft_lora(base: nn.Module, **kw) -> nn.Module:
    """A PEFT LoRA model on a copy of ``base`` with random non-zero lora_B."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out / MHA notices
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    return pm.eval()


def save(pm: nn.Module, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(path))


def load_peft(base: nn.Module, path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


@torch.no_grad()
def randomize(model: nn.Module) -> None:
    for _, layer in flora_layers(model):
        for name in layer.adapter_names:
            core, factors = layer.tensors(name)
            core.normal_(0.0, 0.5)
            for f in factors:
                f.normal_(0.0, 0.5)


def gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_gpt2_conv1d_lora_import_matches_peft(tmp_path):
    base = gpt2()
    pm = peft_lora(base, r=4, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    save(pm, tmp_path)
    model = import_peft(copy.deepcopy(base), tmp_path, backend="reference").eval()
    layers = dict(flora_layers(model))
    attn = layers["transformer.h.0.attn.c_attn"]
    assert type(attn).__name__ == "FLoRALinear" and attn.ranks == (4, 4)
    assert tuple(attn.weight_modes().shape) == (48, 16)  # Conv1D's (16, 48) weight in mode order (out, in)
    for name, layer in layers.items():
        peft_layer = pm.base_model.model.get_submodule(name)
        # PEFT's delta is in Conv1D's stored (in, out) layout
        torch.testing.assert_close(layer.delta_weight().t(), peft_layer.get_delta_weight("default"), atol=1e-6,
                                   rtol=1e-5)
    ids = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(logits(model, ids), logits(pm, ids), atol=ATOL, rtol=RTOL)


def test_gpt2_conv1d_export_round_trip(tmp_path):
    base = gpt2()
    model = fk.inject_flora(copy.deepcopy(base), fk.FLoRAConfig(rank=(3, 2), scale=0.7, target_modules=["c_attn", "c_fc"]))
    randomize(model)
    config = export_peft(model, tmp_path)
    assert config["fan_in_fan_out"] is True
    ids = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(logits(load_peft(base, tmp_path), ids), logits(model, ids), atol=1e-4, rtol=1e-4)
    back = import_peft(copy.deepcopy(base), tmp_path, backend="reference")
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- MultiheadAttention


def vit() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    ).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision initializes the head to zero
    return model


ATTN = "encoder.layers.encoder_layer_0.self_attention"


@torch.no_grad()
def peft_out_proj_factor() -> int:
    """How many times PEFT's MultiheadAttention forward adds its out_proj delta: 2 in peft 0.21
    (huggingface/peft#3774), 1 once fixed. Probed on a bare attention module with PEFT alone."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        attn = nn.MultiheadAttention(4, 1)
        pm = peft_lora(nn.Sequential(attn), r=2, lora_alpha=2, target_modules=["0"])
        q = torch.randn(3, 1, 4)
    lora = pm.base_model.model[0]
    w_in, w_out = attn.in_proj_weight.clone(), attn.out_proj.weight.clone()
    d_in, d_out = lora.get_delta_weight("default"), lora.base_layer.out_proj.get_delta_weight("default")
    y = lora(q, q, q, need_weights=False)[0]
    for factor in (1, 2):
        attn.in_proj_weight.copy_(w_in + d_in)
        attn.out_proj.weight.copy_(w_out + factor * d_out)
        if torch.allclose(attn(q, q, q, need_weights=False)[0], y, atol=1e-6):
            return factor
    raise AssertionError("PEFT's MultiheadAttention forward matches neither W + dW nor W + 2 dW on out_proj")


def counted_as_peft(model: nn.Module) -> nn.Module:
    """A copy of a FLoRA model with each MultiheadAttention out_proj delta counted as PEFT's
    forward counts it (``peft_out_proj_factor``): what PEFT's own forward must then equal."""
    model = copy.deepcopy(model)
    factor = peft_out_proj_factor()
    for name, layer in flora_layers(model):
        if name.endswith(".out_proj") and layer.adapter_names:
            layer.scale = layer.scale * factor
    return model


@torch.no_grad()
def peft_deltas_applied(pm: nn.Module, base: nn.Module) -> nn.Module:
    """``base`` with every PEFT LoRA layer's ``get_delta_weight`` added to its weight: PEFT's
    function by its own deltas. peft 0.21's MultiheadAttention forward adds out_proj's delta
    twice (huggingface/peft#3774), so an MHA with an out_proj LoRA is compared against this."""
    ref = copy.deepcopy(base)
    for name, m in pm.base_model.model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer) and "default" in m.lora_A:
            target = ref.get_submodule(name.replace(".base_layer", ""))
            w = target.in_proj_weight if isinstance(target, nn.MultiheadAttention) else target.weight
            w.add_(m.get_delta_weight("default"))
    return ref.eval()


def test_vit_mha_lora_import_matches_peft(tmp_path):
    base = vit()
    pm = peft_lora(base, r=4, lora_alpha=6, target_modules=["self_attention", "mlp.0"], lora_dropout=0.1,
                   rank_pattern={"encoder_layer_1.self_attention": 2})
    save(pm, tmp_path)
    model = import_peft(copy.deepcopy(base), tmp_path, backend="reference").eval()
    layers = dict(flora_layers(model))
    attn, out = layers[ATTN], layers[ATTN + ".base_layer.out_proj"]
    assert type(attn).__name__ == "FLoRAMultiheadAttention" and attn.ranks == (4, 4)
    assert type(out).__name__ == "FLoRALinear" and out.ranks == (4, 4)
    assert layers["encoder.layers.encoder_layer_1.self_attention"].ranks == (2, 2)
    assert attn.dropout == 0.0 and layers["encoder.layers.encoder_layer_0.mlp.0"].dropout == pytest.approx(0.1)
    peft_attn = pm.base_model.model.get_submodule(ATTN)
    torch.testing.assert_close(attn.delta_weight(), peft_attn.get_delta_weight("default"), atol=1e-6, rtol=1e-5)
    out_delta = pm.base_model.model.get_submodule(ATTN + ".base_layer.out_proj").get_delta_weight("default")
    torch.testing.assert_close(out.delta_weight(), out_delta, atol=1e-6, rtol=1e-5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), peft_deltas_applied(pm, base)(x), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(counted_as_peft(model)(x), pm(x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("targets", [["self_attention", "out_proj"], ["self_attention"], ["out_proj"]],
                         ids=["in+out", "in_proj-only", "out_proj-only"])
def test_vit_mha_export_loads_in_peft(tmp_path, targets):
    """Both parts at different ranks and scales, or one part alone (the other written as zeros)."""
    base = vit()
    cfg = fk.FLoRAConfig(rank=3, scale=0.5, target_modules=targets, rank_pattern={"out_proj": 2},
                         scale_pattern={"out_proj": 1.3})
    model = fk.inject_flora(copy.deepcopy(base), cfg)
    randomize(model)
    config, tensors = to_peft(model)
    assert config["target_modules"].count("self_attention") == 2  # out_proj goes with its attention module
    key = f"base_model.model.{ATTN}.base_layer.out_proj.lora_B.weight"
    r = 3 if "self_attention" in targets else 2
    assert tuple(tensors[key].shape) == (32, r)
    if targets == ["self_attention"]:
        assert not tensors[key].any()
    export_peft(model, tmp_path)
    pm = load_peft(base, tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        assert (y - base(x)).abs().max() > 1e-3  # the adapters do something
        torch.testing.assert_close(peft_deltas_applied(pm, base)(x), y, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pm(x), counted_as_peft(model)(x), atol=1e-4, rtol=1e-4)
    back = import_peft(copy.deepcopy(base), tmp_path, backend="reference").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), y, atol=1e-4, rtol=1e-4)


def test_mha_import_refuses_separate_kv_dims():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)

    state = {"attn.lora_A.weight": torch.zeros(2, 8), "attn.lora_B.weight": torch.zeros(24, 2)}
    with pytest.raises(TypeError, match=r"attn.lora_A.weight: module 'attn' is a MultiheadAttention with kdim=4"):
        import_peft(Net(), state, {"r": 2, "lora_alpha": 2})


# ----------------------------------------------------------------------------- Wav2Vec2


def test_wav2vec2_import_without_input_embeddings(tmp_path):
    cfg = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
    )
    torch.manual_seed(0)
    base = transformers.Wav2Vec2Model(cfg).eval()
    with pytest.raises(NotImplementedError):
        base.get_input_embeddings()
    pm = peft_lora(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "intermediate_dense"])
    save(pm, tmp_path)
    model = import_peft(copy.deepcopy(base), tmp_path, backend="reference").eval()
    assert len(flora_layers(model)) == 3
    x = torch.randn(2, 400)
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, pm(x).last_hidden_state, atol=ATOL, rtol=RTOL)

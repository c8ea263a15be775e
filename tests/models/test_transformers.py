"""Hugging Face transformers models from their configs, random weights, no download.

GPT-2 (transformers' Conv1D, weight stored (in, out); lm_head tied to wte; default targets),
Llama ("all-linear", grouped-query attention), BERT (a list of suffixes plus the word embedding,
a modules_to_save classifier), ViT (a regex that also takes the patch-embedding conv), T5
(lm_head tied to the shared embedding), Whisper (the encoder forward reads ``conv1.stride``;
proj_out tied to the decoder embedding), Wav2Vec2 (default targets: conv feature extractor, and
the positional conv under torch.nn.utils.parametrizations.weight_norm). T5 and Whisper adapt
suffix lists to keep torch.compile short; that the default targets leave their tied heads alone
is checked separately. Also target selection on GPT-2: "all-linear", exclude_modules,
rank_pattern / scale_pattern, and the warning for an unsupported target.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from common import RANK, Case, build, parametrize_cases, run_check

import flora_kernels as fk
from flora_kernels.layers import flora_layers

transformers = pytest.importorskip("transformers")


def token_ids(vocab: int = 100, shape: tuple[int, int] = (2, 8)):
    return lambda: ((), {"input_ids": torch.randint(0, vocab, shape)})


def seq2seq_ids():
    return lambda: ((), {"input_ids": torch.randint(0, 100, (2, 8)), "decoder_input_ids": torch.randint(0, 100, (2, 5))})


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    ))


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ))


def bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))


def vit():
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))


def t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=0.0, tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))


def whisper():
    return transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        vocab_size=100, num_mel_bins=8, encoder_layers=1, decoder_layers=1, d_model=32, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=8,
        max_target_positions=16, dropout=0.0, decoder_start_token_id=0, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, suppress_tokens=None, begin_suppress_tokens=None,
    ))


def wav2vec2():
    return transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(
        vocab_size=20, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=4, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, pad_token_id=0,
    ))


GPT2 = Case(
    "gpt2", gpt2, token_ids(),
    adapted={"transformer.h.0.attn.c_attn": "FLoRALinear", "transformer.h.0.mlp.c_proj": "FLoRALinear"},
    untouched=("lm_head",), tied=(("lm_head", "transformer.wte"),),
)
WHISPER = Case(
    "whisper", whisper,
    lambda: ((), {"input_features": torch.randn(2, 8, 16), "decoder_input_ids": torch.randint(0, 100, (2, 5))}),
    config={"target_modules": ["conv1", "conv2", "q_proj", "v_proj", "fc2"]},
    adapted={"model.encoder.conv1": "FLoRAConv1d", "model.encoder.conv2": "FLoRAConv1d",
             "model.decoder.layers.0.encoder_attn.q_proj": "FLoRALinear"},
    untouched=("proj_out",), tied=(("proj_out", "model.decoder.embed_tokens"),),
)

T5 = Case(
    "t5", t5, seq2seq_ids(), config={"target_modules": ["q", "v", "wo"]},
    adapted={"encoder.block.0.layer.0.SelfAttention.q": "FLoRALinear",
             "decoder.block.0.layer.1.EncDecAttention.v": "FLoRALinear"},
    untouched=("lm_head",), tied=(("lm_head", "shared"),),
)

CASES = [
    GPT2,
    Case(
        "llama", llama, token_ids(), config={"target_modules": "all-linear"},
        adapted={"model.layers.0.self_attn.k_proj": "FLoRALinear", "model.layers.0.mlp.down_proj": "FLoRALinear"},
        untouched=("model.embed_tokens",),
    ),
    Case(
        "bert", bert, token_ids(),
        config={"target_modules": ["query", "key", "value", "dense", "word_embeddings"], "modules_to_save": ["classifier"]},
        adapted={"bert.embeddings.word_embeddings": "FLoRAEmbedding", "bert.encoder.layer.0.attention.self.query": "FLoRALinear",
                 "bert.pooler.dense": "FLoRALinear"},
        untouched=("classifier",),
    ),
    Case(
        "vit", vit, lambda: ((torch.randn(2, 3, 16, 16),), {}),
        config={"target_modules": r".*\.(q_proj|v_proj|fc2|projection)"},
        adapted={"vit.embeddings.patch_embeddings.projection": "FLoRAConv2d",
                 "vit.layers.0.attention.q_proj": "FLoRALinear"},
        untouched=("classifier", "vit.layers.0.attention.k_proj"),
    ),
    T5,
    WHISPER,
    Case(
        "wav2vec2", wav2vec2, lambda: ((torch.randn(2, 400),), {}),
        adapted={"wav2vec2.feature_extractor.conv_layers.0.conv": "FLoRAConv1d",
                 "wav2vec2.encoder.pos_conv_embed.conv": "FLoRAConv1d",
                 "wav2vec2.encoder.layers.0.attention.q_proj": "FLoRALinear", "lm_head": "FLoRALinear"},
    ),
]


@pytest.mark.parametrize("case, check", parametrize_cases(CASES))
def test_model(case: Case, check: str, tmp_path: Path) -> None:
    run_check(case, check, tmp_path)


# ----------------------------------------------------------------------------- model-specific


def test_whisper_encoder_reads_conv_attributes() -> None:
    """Whisper's encoder forward reads ``self.conv1.stride[0]``; the wrapper must expose it."""
    model = build(WHISPER)
    base = model.model.encoder.conv1
    fk.inject_flora(model, WHISPER.cfg())
    conv1 = model.model.encoder.conv1
    assert isinstance(conv1, fk.FLoRALayer) and conv1.base_layer is base
    assert conv1.stride[0] == 1 and model.model.encoder.conv2.stride[0] == 2
    for attr in ("stride", "padding", "dilation", "groups", "kernel_size", "in_channels", "out_channels", "padding_mode"):
        assert getattr(conv1, attr) == getattr(base, attr), attr
    assert conv1.weight is base.weight and conv1.bias is base.bias
    q = model.model.decoder.layers[0].self_attn.q_proj
    assert (q.in_features, q.out_features) == (q.base_layer.in_features, q.base_layer.out_features) == (32, 32)
    with torch.no_grad():
        out = model(**WHISPER.inputs()[1]).logits
    assert out.shape == (2, 5, 100)


@pytest.mark.parametrize("target_modules", [None, "all-linear"])
@pytest.mark.parametrize("case", [GPT2, T5, WHISPER], ids=lambda c: c.id)
def test_default_targets_leave_tied_heads(case: Case, target_modules: str | None) -> None:
    """target_modules=None / "all-linear" never adapt an output head tied to an embedding."""
    model = build(case)
    fk.inject_flora(model, case.cfg(target_modules=target_modules))
    names = _adapted_names(model)
    assert names, "nothing adapted"
    for head, emb in case.tied:
        assert head not in names and emb not in names, f"{target_modules!r} adapted the tied {head} / {emb}"
        assert model.get_submodule(head).weight is model.get_submodule(emb).weight


def _adapted_names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in flora_layers(model)}


def _conv1d_names(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, transformers.pytorch_utils.Conv1D)}


def test_gpt2_all_linear_leaves_tied_head() -> None:
    model = build(GPT2)
    conv1d = _conv1d_names(model)
    fk.inject_flora(model, fk.FLoRAConfig(rank=RANK, target_modules="all-linear"))
    assert _adapted_names(model) == conv1d, "all-linear: every Conv1D and no other module (lm_head is tied to wte)"
    assert model.lm_head.weight is model.transformer.wte.weight


def test_llama_all_linear_takes_every_projection() -> None:
    model = llama().eval()
    proj = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    fk.inject_flora(model, fk.FLoRAConfig(rank=RANK, target_modules="all-linear"))
    names = _adapted_names(model)
    assert proj <= names, f"not adapted: {sorted(proj - names)}"
    assert "model.embed_tokens" not in names


def test_gpt2_exclude_modules() -> None:
    model = build(GPT2)
    conv1d = _conv1d_names(model)
    fk.inject_flora(model, fk.FLoRAConfig(rank=RANK, target_modules="all-linear", exclude_modules=["c_fc", "h.0.attn.c_attn"]))
    excluded = {n for n in conv1d if n.endswith(".c_fc") or n == "transformer.h.0.attn.c_attn"}
    assert len(excluded) == 2
    assert _adapted_names(model) == conv1d - excluded


def test_gpt2_rank_and_scale_patterns() -> None:
    model = build(GPT2)
    cfg = fk.FLoRAConfig(
        rank=RANK, scale=2.0, target_modules="all-linear",
        rank_pattern={"c_fc": 2, r"h\.0\.attn\.c_attn": 3}, scale_pattern={"attn.c_proj": 0.5},
    )
    fk.inject_flora(model, cfg)
    layers = dict(flora_layers(model))
    assert layers
    for name, layer in layers.items():
        want_rank = 2 if name.endswith(".c_fc") else 3 if name == "transformer.h.0.attn.c_attn" else RANK
        want_scale = 0.5 if name.endswith(".attn.c_proj") else 2.0
        assert layer.ranks == (want_rank, want_rank), f"{name}: ranks {layer.ranks}, expected {want_rank}"
        assert layer.core.shape == (want_rank, want_rank)
        assert layer.scale == want_scale, f"{name}: scale {layer.scale}, expected {want_scale}"


def test_unsupported_target_warns() -> None:
    model = build(GPT2)
    with pytest.warns(UserWarning) as record:
        fk.inject_flora(model, fk.FLoRAConfig(rank=RANK, target_modules=["c_attn", "ln_f"]))
    messages = [str(w.message) for w in record]
    assert any("transformer.ln_f" in m and "LayerNorm" in m for m in messages), messages
    names = _adapted_names(model)
    assert names == {"transformer.h.0.attn.c_attn"}


def test_supported_targets_do_not_warn() -> None:
    model = build(GPT2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fk.inject_flora(model, fk.FLoRAConfig(rank=RANK, target_modules="all-linear"))
    flora = [str(w.message) for w in record if "FLoRA" in str(w.message)]
    assert not flora, flora

"""FLoRA as a PEFT method (``flora_kernels.peft``) against the real peft and transformers.

Every model is tiny and built from a config (no downloads); outputs are compared with the
library's own path (``fk.inject_flora`` / ``fk.load_flora`` on a twin holding the same tensors).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from helpers import assert_close
from torch import nn

import flora_kernels as fk
from flora_kernels.layers import FLoRALayer, FLoRALinear, flora_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

import flora_kernels.peft as fkp

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
ROOT = os.path.dirname(TESTS_DIR)
VOCAB = 64


def tiny_bert() -> BertForSequenceClassification:
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.3,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 7))


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Random adapter tensors (the paper init has dW = 0, which would hide every mistake)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in flora_layers(model):
            for name in layer.adapter_names:
                core, factors = layer.tensors(name)
                for t in (core, *factors):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def copy_adapters(src: nn.Module, dst: nn.Module, names: list[str]) -> None:
    """Copy adapter tensors between models whose FLoRA layers have the same real names."""
    dst_layers = dict(flora_layers(dst))
    with torch.no_grad():
        for real, layer in flora_layers(src):
            for name in names:
                if name in layer.flora_settings:
                    (c, fs), (dc, dfs) = layer.tensors(name), dst_layers[real].tensors(name)
                    dc.copy_(c)
                    for d, s in zip(dfs, fs, strict=True):
                        d.copy_(s)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ----------------------------------------------------------------------------- registration / config


def test_flora_is_registered_with_peft():
    from peft import mapping

    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["FLORA"] is fkp.FloraConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["FLORA"] is fkp.FloraModel
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["FLORA"] == "flora_"
    cfg = PeftConfig.from_peft_type(peft_type="FLORA", r=4, target_modules=["query"])
    assert isinstance(cfg, fkp.FloraConfig) and cfg.peft_type == "FLORA" and cfg.r == 4
    pm = get_peft_model(tiny_bert(), fkp.FloraConfig(r=2, target_modules=["query"]))
    assert pm.get_model_status().peft_types == {"default": "FLORA"}


def test_config_mirrors_flora_config():
    cfg = fk.FLoRAConfig(
        rank=(4, 2), kernel_rank=2, scale=0.5, dropout=0.1, target_modules=("query", "value"),
        exclude_modules="bert\\.encoder\\.layer\\.0\\..*", modules_to_save=("classifier",),
        rank_pattern={"value": 3}, scale_pattern={"query": 2.0}, strategy="factorized", backend="reference",
    )
    pc = fkp.FloraConfig.from_flora_config(cfg, task_type="SEQ_CLS")
    assert (pc.r, pc.kernel_r, pc.scale, pc.flora_dropout) == ([4, 2], 2, 0.5, 0.1)
    assert pc.task_type == "SEQ_CLS" and not pc.inference_mode
    back, info = pc.to_flora_config()
    assert back == cfg and info == {}
    with pytest.raises(ValueError, match="rank"):
        fkp.FloraConfig(r=0)
    with pytest.raises(ValueError, match="strategy"):
        fkp.FloraConfig(strategy="fast")


# ----------------------------------------------------------------------------- get_peft_model


def test_get_peft_model_uses_the_library_layers(ids, capsys):
    base = tiny_bert()
    pm = get_peft_model(copy.deepcopy(base), fkp.FloraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    twin = fk.inject_flora(copy.deepcopy(base), fk.FLoRAConfig(rank=4, target_modules=("query", "value")))
    layers = flora_layers(pm.base_model.model)
    assert len(layers) == 4
    assert all(isinstance(m, FLoRALinear) and isinstance(m, BaseTunerLayer) for _, m in layers)
    assert [n for n, _ in layers] == [n for n, _ in flora_layers(twin)]

    perturb(pm)
    copy_adapters(pm.base_model.model, twin, ["default"])
    assert_close(logits(pm, ids), logits(twin, ids), rtol=1e-6, atol=1e-6)
    assert (logits(pm, ids) - logits(base, ids)).abs().max() > 0.1

    adapter = sum(p.numel() for _, m in layers for p in (m.core, *m.factors))
    head = sum(p.numel() for p in base.classifier.parameters())  # SEQ_CLS: the head is a modules_to_save copy
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert all(".flora_" in n or ".classifier.modules_to_save.default." in n for n in trainable)
    total = sum(p.numel() for p in pm.parameters())
    pm.print_trainable_parameters()
    assert f"trainable params: {adapter + head:,d} || all params: {total:,d}" in capsys.readouterr().out


def test_patterns_and_exclusions_select_like_the_library():
    cfg = fkp.FloraConfig(
        r=2, target_modules=["query", "value"], exclude_modules=["layer.1.attention.self.query"],
        rank_pattern={"value": 4}, scale_pattern={"query": 0.5},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = get_peft_model(tiny_bert(), cfg)
    # PEFT warns when exclude_modules excluded nothing or a pattern matched nothing: neither holds here
    assert not [w for w in caught if "exclude_modules" in str(w.message) or "did not match" in str(w.message)]
    got = {n: (m.ranks, m.scale) for n, m in flora_layers(pm.base_model.model)}
    twin = fk.inject_flora(tiny_bert(), cfg.to_flora_config()[0])
    assert got == {n: (m.ranks, m.scale) for n, m in flora_layers(twin)}
    assert got == {
        "bert.encoder.layer.0.attention.self.query": ((2, 2), 0.5),
        "bert.encoder.layer.0.attention.self.value": ((4, 4), 1.0),
        "bert.encoder.layer.1.attention.self.value": ((4, 4), 1.0),
    }


def test_disable_adapter_context_and_merge_and_unload(ids):
    base = tiny_bert()
    pm = get_peft_model(copy.deepcopy(base), fkp.FloraConfig(r=3, target_modules=["query", "key", "dense"]))
    perturb(pm)
    y, y_base = logits(pm, ids), logits(base, ids)
    with pm.disable_adapter():
        assert_close(logits(pm, ids), y_base)  # other instances: dispatch may pick another path
    assert_close(logits(pm, ids), y)  # other instances: dispatch may pick another path

    pm.merge_adapter()
    assert_close(logits(pm, ids), y, rtol=1e-5, atol=1e-5)
    pm.unmerge_adapter()
    original = dict(base.named_parameters())
    for n, p in pm.base_model.model.named_parameters():
        if ".base_layer." in n:
            assert_close(p, original[n.replace(".base_layer.", ".")], rtol=1e-5, atol=1e-6, msg=n)

    merged = pm.merge_and_unload()
    assert not any(isinstance(m, (FLoRALayer, BaseTunerLayer)) for m in merged.modules())
    assert type(merged.bert.encoder.layer[0].attention.self.query) is nn.Linear
    assert not hasattr(merged, "flora_configs")
    assert_close(logits(merged, ids), y, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_all_linear_keeps_config_and_merges(ids):
    base = tiny_gpt2()
    cfg = fkp.FloraConfig(r=2, target_modules="all-linear")
    pm = get_peft_model(copy.deepcopy(base), cfg)
    names = {n.rsplit(".", 1)[-1] for n, _ in flora_layers(pm.base_model.model)}
    assert names == {"c_attn", "c_proj", "c_fc"}  # transformers Conv1D; the tied lm_head is left out
    assert pm.peft_config["default"].target_modules == "all-linear"  # PEFT's in-place expansion undone
    assert set(pm.peft_config["default"].layer_info) == {n for n, _ in flora_layers(pm.base_model.model)}
    perturb(pm)
    y = logits(pm, ids)
    merged = pm.merge_and_unload()
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert_close(logits(merged, ids), y, rtol=1e-5, atol=1e-5)


def test_conv_model_with_kernel_rank(tmp_path):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.head = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x).mean((2, 3)))

    base = Net().eval()
    x = torch.randn(2, 3, 5, 5)
    pm = get_peft_model(copy.deepcopy(base), fkp.FloraConfig(r=2, kernel_r=1, target_modules=["conv"]))
    layer = pm.base_model.model.conv
    assert type(layer).__name__ == "PeftFLoRAConv2d" and layer.ranks == (2, 2, 1, 1)
    perturb(pm)
    y = pm(x).detach()
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert_close(loaded(x), y)  # other instances: dispatch may pick another path
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False: inference
    assert_close(loaded.merge_and_unload()(x), y, rtol=1e-5, atol=1e-5)


def test_transformer_encoder_layer_attention_and_out_proj():
    base = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    targets = ["self_attn", "out_proj", "linear1"]
    pm = get_peft_model(copy.deepcopy(base), fkp.FloraConfig(r=2, target_modules=targets))
    twin = fk.inject_flora(copy.deepcopy(base), fk.FLoRAConfig(rank=2, target_modules=tuple(targets)))
    perturb(pm)
    copy_adapters(pm.base_model.model, twin, ["default"])
    with torch.no_grad():
        y = pm(x)
        assert_close(y, twin(x), rtol=1e-6, atol=1e-6)
    merged = pm.merge_and_unload()
    assert type(merged.self_attn) is nn.MultiheadAttention and type(merged.linear1) is nn.Linear
    assert type(merged.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert merged.activation_relu_or_gelu == base.activation_relu_or_gelu  # the native fast path is back
    with torch.no_grad():
        assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- several adapters


def test_add_set_delete_adapter_match_the_library(ids):
    base = tiny_gpt2()
    pm = get_peft_model(copy.deepcopy(base), fkp.FloraConfig(r=2, target_modules=["c_attn"]))
    pm.add_adapter("other", fkp.FloraConfig(r=3, scale=0.5, target_modules=["c_attn", "c_fc"]))
    twin = fk.inject_flora(copy.deepcopy(base), fk.FLoRAConfig(rank=2, target_modules=("c_attn",)))
    fk.add_adapter(twin, "other", fk.FLoRAConfig(rank=3, scale=0.5, target_modules=("c_attn", "c_fc")))
    perturb(pm)
    copy_adapters(pm.base_model.model, twin, ["default", "other"])

    def grads(model: nn.Module) -> set[str]:
        return {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}

    assert pm.active_adapters == ["default"] and grads(pm) == {"default"}  # added adapters start inactive
    assert_close(logits(pm, ids), logits(twin, ids), rtol=1e-6, atol=1e-6)
    pm.set_adapter("other")
    fk.set_adapter(twin, "other")
    assert grads(pm) == {"other"} and fk.active_adapters(pm.base_model.model) == ["other"]
    assert_close(logits(pm, ids), logits(twin, ids), rtol=1e-6, atol=1e-6)
    pm.base_model.set_adapter(["default", "other"])  # several active adapters are summed
    fk.set_adapter(twin, ["default", "other"])
    assert_close(logits(pm, ids), logits(twin, ids), rtol=1e-6, atol=1e-6)

    pm.set_adapter("other")
    with pytest.warns(UserWarning, match="Setting active adapter to default"):
        pm.delete_adapter("other")
    assert list(pm.peft_config) == ["default"] and pm.active_adapters == ["default"]
    assert not any("other" in m.flora_settings for _, m in flora_layers(pm.base_model.model))
    with pytest.raises(ValueError, match="other"):
        pm.set_adapter("other")
    fk.delete_adapter(twin, "other")
    fk.set_adapter(twin, "default")
    assert_close(logits(pm, ids), logits(twin, ids), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- save / load


_CHILD = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    import flora_bench.torchvision_compat  # noqa: F401  (see flora_bench/torchvision_compat.py)
    import torch
    import flora_kernels.peft  # registers FLORA with peft
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    base = BertForSequenceClassification.from_pretrained({base!r}).eval()
    model = PeftModel.from_pretrained(base, {adapter!r})
    print(type(model.base_model).__name__, type(model.base_model.model.bert.encoder.layer[0].attention.self.query).__name__)
    with torch.no_grad():
        torch.save(model(input_ids=torch.load({ids!r})).logits, {out!r})
    """
)


def test_save_pretrained_loads_in_a_fresh_process(tmp_path, ids):
    base = tiny_bert()
    base.save_pretrained(tmp_path / "base")
    pm = get_peft_model(copy.deepcopy(base), fkp.FloraConfig(r=3, target_modules=["query", "value"], task_type="SEQ_CLS"))
    perturb(pm)
    with torch.no_grad():
        pm.base_model.model.classifier.modules_to_save["default"].weight.mul_(2.0)
    pm.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(".flora_" in k or k.startswith("base_model.model.classifier.") for k in saved)
    torch.save(ids, tmp_path / "ids.pt")
    script = _CHILD.format(root=ROOT, tests=TESTS_DIR, base=str(tmp_path / "base"), adapter=str(tmp_path / "adapter"),
                           ids=str(tmp_path / "ids.pt"), out=str(tmp_path / "out.pt"))
    run = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["FloraModel", "PeftFLoRALinear"]
    # equal up to float32 rounding: each process's measured dispatch may pick another (backend,
    # strategy) for a layer, and those round differently
    assert_close(torch.load(tmp_path / "out.pt"), logits(pm, ids), rtol=1e-5, atol=1e-6)


def test_fk_save_flora_to_peft_and_back_to_fk_load_flora(tmp_path, ids):
    base = tiny_bert()
    model = fk.inject_flora(
        copy.deepcopy(base), fk.FLoRAConfig(rank=3, target_modules=("query", "value"), modules_to_save=("classifier",))
    )
    fk.add_adapter(model, "extra", fk.FLoRAConfig(rank=(2, 3), scale=0.5, target_modules=("key",)))
    perturb(model)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
    y = logits(model, ids)
    fk.set_adapter(model, "extra")
    y_extra = logits(model, ids)
    fk.save_flora(model, tmp_path / "fk")  # "default" at the root, "extra" in fk/extra

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of fk's adapter_config.json is a FloraConfig field
        loaded_cfg = PeftConfig.from_pretrained(tmp_path / "fk")
    assert isinstance(loaded_cfg, fkp.FloraConfig) and loaded_cfg.to_flora_config()[0] == model.flora_configs["default"]
    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fk")
    pm.load_adapter(tmp_path / "fk" / "extra", "extra")
    assert_close(logits(pm, ids), y)  # other instances: dispatch may pick another path
    pm.set_adapter("extra")  # PEFT: the saved head belongs to "default"; "extra" runs with the original head
    assert torch.equal(pm.base_model.model.classifier.original_module.weight, base.classifier.weight)
    pm.set_adapter("default")
    pm.save_pretrained(tmp_path / "peft")
    assert sorted(os.listdir(tmp_path / "peft" / "extra")) == ["adapter_config.json", "adapter_model.safetensors"]

    back = fk.load_flora(copy.deepcopy(base), tmp_path / "peft")
    assert sorted(back.flora_configs) == ["default", "extra"] and fk.active_adapters(back) == ["default"]
    assert_close(logits(back, ids), y)  # other instances: dispatch may pick another path
    fk.set_adapter(back, "extra")  # the library: one head, loaded with "default"'s weights, as in `model`
    assert_close(logits(back, ids), y_extra)  # other instances: dispatch may pick another path
    with open(tmp_path / "peft" / "adapter_config.json") as f:
        assert json.load(f)["peft_type"] == "FLORA"


def test_load_is_frozen_unless_trainable(tmp_path):
    pm = get_peft_model(tiny_bert(), fkp.FloraConfig(r=2, target_modules=["query"]))
    pm.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    trainable = PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in trainable.named_parameters() if ".flora_" in n
    }


# ----------------------------------------------------------------------------- Trainer


def test_trainer_trains_and_checkpoints_the_adapter_only(tmp_path):
    base = tiny_bert()
    pm = get_peft_model(copy.deepcopy(base), fkp.FloraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, VOCAB, (6,), generator=g), "labels": torch.tensor(i % 3)} for i in range(12)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=0.05, use_cpu=True,
        report_to=[], save_strategy="steps", save_steps=3, logging_steps=1, disable_tqdm=True, seed=0,
    )
    Trainer(model=pm, args=args, train_dataset=data).train()

    ckpt = tmp_path / "checkpoint-3"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    assert not any(f.startswith(("model.", "pytorch_model")) for f in os.listdir(ckpt))
    saved = load_file(ckpt / "adapter_model.safetensors")
    assert saved and all(".flora_" in k or k.startswith("base_model.model.classifier.") for k in saved)
    live = pm.state_dict()
    for k, v in saved.items():
        if ".flora_" in k:
            assert_close(v, live[k + ".default"], rtol=0, atol=0, msg=k)
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(".flora_" in n or ".modules_to_save.default." in n for n in changed)
    assert any(".flora_core." in n for n in changed)


# ----------------------------------------------------------------------------- PEFT checks, optional peft


def test_check_peft_names_what_changed(monkeypatch):
    fkp.check_peft()  # the installed peft passes
    with pytest.raises(ImportError, match=r"peft version: expected >=0.21,<0.22, got 0.22.0"):
        fkp.check_peft("0.22.0")

    def renamed(self, config, adapter, target, name, parent, key):  # a changed hook signature
        raise AssertionError

    monkeypatch.setattr(BaseTuner, "_create_and_replace", renamed)
    monkeypatch.setattr(peft.mapping, "PEFT_TYPE_TO_PREFIX_MAPPING", ())
    with pytest.raises(ImportError) as err:
        fkp.check_peft()
    assert "BaseTuner._create_and_replace: expected parameters" in str(err.value)
    assert "peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING: expected a dict, got tuple" in str(err.value)


def test_peft_stays_optional():
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import flora_kernels
        assert "peft" not in sys.modules and "transformers" not in sys.modules, "flora_kernels imported peft"
        sys.modules["peft"] = None  # as if peft were not installed
        try:
            import flora_kernels.peft
        except ImportError as e:
            print(e)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "flora_kernels.peft needs the peft package" in run.stdout

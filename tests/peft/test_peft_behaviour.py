"""FLoRA behaves as a PEFT method does, in ``fk.*`` and through PEFT alike (one regression test
per behaviour PEFT defines: disabling a merged model, trainability after add/load/set/disable,
deleting next to a merged adapter, PEFT's warnings and errors, low_cpu_mem_usage,
autocast_adapter_dtype, in_features/out_features, dropout on MultiheadAttention, and the
``adapter_names=`` mixed batches of forward and generate)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import flora_kernels as fk
from flora_kernels.layers import flora_layers
from flora_kernels.model import install_adapters
from flora_kernels.testing import rel_err, tolerance

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import PeftModel, get_peft_model

import flora_kernels.peft as fkp


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 12)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.relu(self.lin0(x)))


def _x() -> torch.Tensor:
    return torch.randn(6, 10)


def _fk_model(**kw) -> tuple[nn.Module, nn.Module]:
    base = MLP()
    cfg = fk.FLoRAConfig(**{"rank": 3, "target_modules": ("lin0", "lin1"), "init_weights": False, **kw})
    return base, fk.inject_flora(copy.deepcopy(base), cfg)


def _peft_model(**kw) -> tuple[nn.Module, nn.Module]:
    base = MLP()
    cfg = fkp.FloraConfig(**{"r": 3, "target_modules": ["lin0", "lin1"], "init_weights": False, **kw})
    return base, get_peft_model(copy.deepcopy(base), cfg)


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to the rounding of another path (merged weights): the project's tolerance."""
    err = rel_err(out, ref)
    assert err <= tolerance(ref.dtype), f"norm-relative error {err:.3e} > {tolerance(ref.dtype):g}"


def _adapter_grads(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters() if "flora_" in n}


# --------------------------------------------------------------------------- disable while merged


@torch.no_grad()
def test_fk_disable_while_merged_gives_the_base_output():
    base, model = _fk_model()
    x = _x()
    y_base, y = base(x), model(x)
    fk.merge_flora(model)
    with fk.disable_adapter(model):
        _close(model(x), y_base)
    assert not any(layer.merged for _, layer in flora_layers(model))  # PEFT: left unmerged
    _close(model(x), y)


@torch.no_grad()
def test_peft_disable_while_merged_gives_the_base_output():
    base, pm = _peft_model()
    x = _x()
    y_base, y = base(x), pm(x)
    pm.merge_adapter()
    with pm.disable_adapter():
        _close(pm(x), y_base)
    _close(pm(x), y)
    pm.merge_adapter()
    pm.base_model.disable_adapter_layers()
    _close(pm(x), y_base)


# --------------------------------------------------------------------------- trainability


def test_peft_add_adapter_keeps_the_active_modules_to_save_trainable():
    _, pm = _peft_model(target_modules=["lin0"], modules_to_save=["lin1"])
    pm.add_adapter("other", fkp.FloraConfig(r=2, target_modules=["lin0"], modules_to_save=["lin1"]))
    saved = pm.base_model.model.lin1.modules_to_save
    assert all(p.requires_grad for p in saved["default"].parameters())
    assert not any(p.requires_grad for p in saved["other"].parameters())


def test_fk_add_adapter_keeps_trainability():
    _, model = _fk_model()
    model.lin1.base_layer.bias.requires_grad_(True)  # a user's choice survives adding an adapter
    fk.add_adapter(model, "other", fk.FLoRAConfig(rank=2, target_modules=("lin0",)))
    grads = _adapter_grads(model)
    assert all(v for n, v in grads.items() if n.endswith(".default"))
    assert not any(v for n, v in grads.items() if n.endswith(".other"))
    assert model.lin1.base_layer.bias.requires_grad and not model.lin0.base_layer.weight.requires_grad
    fk.set_adapter(model, "other", inference_mode=True)
    assert not any(_adapter_grads(model).values())


@pytest.mark.parametrize("is_trainable", [False, True])
def test_peft_load_adapter_keeps_trainability(tmp_path, is_trainable):
    _, pm = _peft_model()
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MLP(), tmp_path, is_trainable=is_trainable)
    loaded.load_adapter(tmp_path, adapter_name="other", is_trainable=is_trainable)
    grads = _adapter_grads(loaded)
    assert set(grads.values()) == {is_trainable}  # "default" and "other" alike
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if "flora_" not in n)
    loaded.load_adapter(tmp_path, adapter_name="third", is_trainable=not is_trainable)
    grads = _adapter_grads(loaded)
    assert all(v == (not is_trainable) for n, v in grads.items() if n.endswith(".third"))
    assert all(v == is_trainable for n, v in grads.items() if not n.endswith(".third"))


@pytest.mark.parametrize("api", ["fk", "peft"])
def test_disabled_adapters_are_frozen(api):
    _, model = _fk_model() if api == "fk" else _peft_model()
    layers = [layer for _, layer in flora_layers(model)]
    if api == "fk":
        ctx = fk.disable_adapter(model)
    else:
        ctx = model.disable_adapter()
    with ctx:
        assert not any(_adapter_grads(model).values())
    assert all(_adapter_grads(model).values())
    layers[0].enable_adapters(False)
    assert not any(p.requires_grad for p in layers[0].parameters())
    layers[0].enable_adapters(True)
    assert all(v for n, v in _adapter_grads(layers[0]).items())


# --------------------------------------------------------------------------- delete next to a merged adapter


@pytest.mark.parametrize("api", ["fk", "peft"])
@torch.no_grad()
def test_delete_keeps_the_other_adapter_merged(api):
    _, model = _fk_model() if api == "fk" else _peft_model()
    x = _x()
    y = model(x)
    cfg = fk.FLoRAConfig(rank=2, target_modules=("lin0",), init_weights=False)
    if api == "fk":
        fk.add_adapter(model, "other", cfg)
        fk.merge_flora(model)
        with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['default'\] while they are merged"):
            fk.delete_adapter(model, "default")
        fk.delete_adapter(model, "other")
    else:
        model.add_adapter("other", fkp.FloraConfig.from_flora_config(cfg))
        model.merge_adapter()
        with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['default'\] while they are merged"):
            model.delete_adapter("default")
        model.delete_adapter("other")
    assert all(layer.merged_adapters == ["default"] for _, layer in flora_layers(model))
    _close(model(x), y)


def test_fk_deleting_the_active_adapter_activates_the_first_remaining_one():
    _, model = _fk_model()
    fk.add_adapter(model, "b", fk.FLoRAConfig(rank=2, target_modules=("lin0",)))
    fk.add_adapter(model, "a", fk.FLoRAConfig(rank=2, target_modules=("lin0",)))
    with pytest.warns(UserWarning, match="Adapter default was active which is now deleted. Setting active adapter to a"):
        fk.delete_adapter(model, "default")
    assert fk.active_adapters(model) == ["a"] and model.lin0.flora_core["a"].requires_grad


# --------------------------------------------------------------------------- warnings and errors


@pytest.mark.parametrize("api", ["fk", "peft"])
def test_merge_warnings_and_safe_merge_error(api):
    _, model = _fk_model() if api == "fk" else _peft_model()
    merge = (lambda: fk.merge_flora(model)) if api == "fk" else model.merge_adapter
    unmerge = (lambda: fk.unmerge_flora(model)) if api == "fk" else model.unmerge_adapter
    with pytest.warns(UserWarning, match="Already unmerged. Nothing to do."):
        unmerge()
    merge()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do."):
        merge()
    unmerge()
    w = model.lin0.base_layer.weight.detach().clone()
    with torch.no_grad():
        model.lin0.flora_core["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.lin0.merge(safe_merge=True)
    assert torch.equal(model.lin0.base_layer.weight, w) and not model.lin0.merged


def test_fk_set_adapter_on_a_merged_model_unmerges_with_peft_warning():
    _, model = _fk_model()
    fk.merge_flora(model)
    with pytest.warns(UserWarning, match="Adapter cannot be set when the model is merged. Unmerging the model first."):
        fk.set_adapter(model, "default")
    assert not any(layer.merged for _, layer in flora_layers(model))


# --------------------------------------------------------------------------- low_cpu_mem_usage, dtypes


@torch.no_grad()
def test_low_cpu_mem_usage_creates_meta_adapters_and_loads(tmp_path):
    base, pm = _peft_model()
    x = _x()
    y = pm(x)
    pm.save_pretrained(tmp_path)
    meta = get_peft_model(MLP(), fkp.FloraConfig(r=3, target_modules=["lin0"]), low_cpu_mem_usage=True)
    assert all(p.device.type == "meta" for n, p in meta.named_parameters() if "flora_" in n)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    torch.testing.assert_close(loaded(x), y)


@torch.no_grad()
def test_fk_load_flora_low_cpu_mem_usage(tmp_path):
    base, model = _fk_model()
    x = _x()
    fk.save_flora(model, tmp_path)
    meta = fk.inject_flora(MLP(), fk.FLoRAConfig(rank=3, target_modules=("lin0",)))
    install_adapters(meta, {"lin1": {"rank": 2}}, "m", fk.FLoRAConfig(rank=2), low_cpu_mem_usage=True)
    assert meta.lin1.flora_core["m"].device.type == "meta"
    loaded = fk.load_flora(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    torch.testing.assert_close(loaded(x), model(x))  # another instance: dispatch may pick another path
    assert all(v for v in _adapter_grads(loaded).values())


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype(autocast, tmp_path):
    base = MLP().to(torch.bfloat16)
    pm = get_peft_model(base, fkp.FloraConfig(r=3, target_modules=["lin0", "lin1"]), autocast_adapter_dtype=autocast)
    pm.add_adapter("other", fkp.FloraConfig(r=2, target_modules=["lin0"]), autocast_adapter_dtype=autocast)
    want = torch.float32 if autocast else torch.bfloat16
    assert {p.dtype for n, p in pm.named_parameters() if "flora_" in n} == {want}
    y = pm(_x().to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MLP().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast)
    assert {p.dtype for n, p in loaded.named_parameters() if "flora_" in n} == {want}


# --------------------------------------------------------------------------- layer attributes, MHA dropout


def test_in_and_out_features_of_every_layer_type():
    from transformers.pytorch_utils import Conv1D

    cases = [
        (nn.Linear(4, 6), 4, 6), (Conv1D(6, 4), 4, 6), (nn.Conv1d(4, 6, 3), 4, 6), (nn.Conv2d(4, 6, 3), 4, 6),
        (nn.Conv3d(4, 6, 3), 4, 6), (nn.ConvTranspose2d(4, 6, 3), 4, 6), (nn.Embedding(10, 6), 10, 6),
        (nn.MultiheadAttention(8, 2), 8, 24),
    ]
    for module, fin, fout in cases:
        layer = fk.layers.wrap(module, rank=2)
        assert (layer.in_features, layer.out_features) == (fin, fout), type(module).__name__


def test_dropout_on_multihead_attention_is_accepted_with_a_warning():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.warns(UserWarning, match="dropout=0.1 is not applied on a MultiheadAttention"):
        pm = get_peft_model(model, fkp.FloraConfig(r=2, target_modules=["0"], flora_dropout=0.1))
    x = torch.randn(5, 3, 8)
    y, _ = pm.base_model.model[0](x, x, x)
    assert y.shape == (5, 3, 8)


# --------------------------------------------------------------------------- mixed batches


def _two_adapters(model: nn.Module, targets: list[str], targets1: list[str] | None = None) -> nn.Module:
    kw = {"init_weights": False, "backend": "reference", "strategy": "factorized"}
    pm = get_peft_model(model, fkp.FloraConfig(r=3, target_modules=targets, **kw), "a0")
    pm.add_adapter("a1", fkp.FloraConfig(r=2, scale=2.0, target_modules=targets1 or targets, **kw))
    return pm.eval()


@pytest.mark.parametrize("targets1", [None, ["lin1"]], ids=["same-layers", "other-layers"])
@torch.no_grad()
def test_adapter_names_mixed_batch_on_mlp(targets1):
    pm = _two_adapters(MLP(), ["lin0", "lin1"], targets1)
    x = _x()
    names = ["__base__", "a0", "a1", "a1", "__base__", "a0"]
    with pm.disable_adapter():
        y_base = pm(x)
    alone = {"__base__": y_base}
    for a in ("a0", "a1"):
        pm.set_adapter(a)
        alone[a] = pm(x)
    y = pm(x, adapter_names=names)
    for i, n in enumerate(names):
        torch.testing.assert_close(y[i], alone[n][i])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs"):
        pm(x, adapter_names=names[:3])
    with pytest.raises(ValueError, match=r"Trying to infer with non-existing adapter\(s\): nope"):
        pm(x, adapter_names=["nope"] * 6)
    pm.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode."):
        pm(x, adapter_names=names)


def _tiny_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@torch.no_grad()
def test_adapter_names_mixed_batch_on_gpt2_forward_and_generate():
    """GPT-2's Conv1D layers: each sample of a mixed batch equals running its adapter alone,
    in forward and in greedy generate."""
    pm = _two_adapters(_tiny_gpt2(), ["c_attn", "c_proj", "c_fc"])
    ids = torch.randint(0, 50, (4, 7))
    names = ["a1", "__base__", "a0", "a1"]
    logits = pm(input_ids=ids, adapter_names=names).logits
    gen = pm.generate(input_ids=ids, adapter_names=names, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for i, n in enumerate(names):
        row = ids[i : i + 1]
        if n == "__base__":
            with pm.disable_adapter():
                want, want_gen = pm(input_ids=row).logits, pm.generate(
                    input_ids=row, max_new_tokens=4, do_sample=False, pad_token_id=0
                )
        else:
            pm.set_adapter(n)
            want = pm(input_ids=row).logits
            want_gen = pm.generate(input_ids=row, max_new_tokens=4, do_sample=False, pad_token_id=0)
        _close(logits[i : i + 1], want)
        assert torch.equal(gen[i : i + 1], want_gen)
    # the mixed batch differs from running every sample with one adapter
    pm.set_adapter("a0")
    assert not torch.allclose(pm(input_ids=ids).logits, logits)


def test_no_warning_from_a_plain_merge_cycle():
    _, model = _fk_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fk.merge_flora(model)
        fk.unmerge_flora(model)


def _tiny_t5() -> nn.Module:
    cfg = transformers.T5Config(
        vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
@torch.no_grad()
def test_adapter_names_with_beam_search(arch):
    """num_beams > 1 repeats each name per beam (the encoder of an encoder-decoder keeps the
    original batch): each sample equals its adapter's own beam search."""
    model, targets = (_tiny_gpt2(), ["c_attn", "c_fc"]) if arch == "gpt2" else (_tiny_t5(), ["q", "v", "wi"])
    pm = _two_adapters(model, targets)
    ids = torch.randint(2, 50, (3, 6))
    names = ["a1", "__base__", "a0"]
    kw = {"max_new_tokens": 3, "num_beams": 2, "do_sample": False, "pad_token_id": 0}
    gen = pm.generate(input_ids=ids, adapter_names=names, **kw)
    for i, n in enumerate(names):
        if n == "__base__":
            with pm.disable_adapter():
                want = pm.generate(input_ids=ids[i : i + 1], **kw)
        else:
            pm.set_adapter(n)
            want = pm.generate(input_ids=ids[i : i + 1], **kw)
        assert torch.equal(gen[i : i + 1, : want.shape[1]], want), (i, n)

"""Model-level API: inject (matching, freezing, sharing), training step, merge/unmerge/unload,
save/load (exact round trip, failures leave the model untouched), modules_to_save,
param_summary, disable_adapter, set_adapter_scale."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

import flora_kernels as fk
from flora_kernels.layers import FLoRALayer, flora_layers
from helpers import assert_close, assert_rel_close, einsum_reconstruct, randomize_

ALL_SUPPORTED = ["blocks.0", "blocks.1", "fc1", "head", "stem"]


class Net(nn.Module):
    """Small model with every supported type plus an unsupported one (GroupNorm)."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1))
        self.norm = nn.GroupNorm(2, 8)
        self.seq = nn.Conv1d(8, 8, 3, padding=1, padding_mode="circular")
        self.fc1 = nn.Linear(8, hidden)
        self.head = nn.Linear(hidden, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.blocks(torch.relu(self.stem(x))))
        h = self.seq(h.flatten(2)).mean(-1)
        return self.head(torch.relu(self.fc1(h)))


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6)


def _cfg(**kw) -> fk.FLoRAConfig:
    kw.setdefault("rank", 3)
    kw.setdefault("backend", "reference")
    return fk.FLoRAConfig(**kw)


def _adapted(**kw) -> tuple[nn.Module, nn.Module]:
    """(original model, a deep copy injected with random adapters)."""
    orig = Net()
    model = fk.inject_flora(copy.deepcopy(orig), _cfg(**kw))
    for _, layer in flora_layers(model):
        randomize_(layer)
    return orig, model


def _names(model: nn.Module) -> list[str]:
    return sorted(n for n, _ in flora_layers(model))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- inject ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "targets,want",
    [
        (["stem", "fc1"], ["fc1", "stem"]),
        (["0"], ["blocks.0"]),  # suffix
        (["1"], ["blocks.1"]),  # suffix: not fc1
        (["blocks.1", "head"], ["blocks.1", "head"]),
        (r"blocks\.\d", ["blocks.0", "blocks.1"]),  # regex, full match
        ("stem|head", ["head", "stem"]),
        (r"fc", None),  # a regex must match the whole name
        (None, ALL_SUPPORTED + ["seq"]),
    ],
    ids=["exact", "suffix-0", "suffix-1-not-fc1", "exact-nested", "regex", "regex-alt", "regex-partial", "all"],
)
def test_inject_matching(targets, want):
    model = Net()
    if want is None:
        with pytest.raises(ValueError, match=r"matched no supported module; candidates: \['stem', 'blocks.0'"):
            fk.inject_flora(model, _cfg(target_modules=targets))
        return
    out = fk.inject_flora(model, _cfg(target_modules=targets))
    assert out is model
    assert _names(model) == sorted(want)
    assert model.flora_config.target_modules == (tuple(targets) if isinstance(targets, list) else targets)


def test_inject_nothing_matched_lists_candidates():
    with pytest.raises(ValueError) as e:
        fk.inject_flora(Net(), _cfg(target_modules=["nope"]))
    msg = str(e.value)
    assert "['nope']" in msg or "('nope',)" in msg
    for name in ALL_SUPPORTED + ["seq"]:
        assert repr(name) in msg, msg


def test_inject_unsupported_type_named():
    model = Net()
    before = _state(model)
    msg = r"module 'norm' \(GroupNorm\) matches target_modules=\('norm', 'stem'\) but cannot be adapted"
    with pytest.warns(UserWarning, match=msg):
        fk.inject_flora(model, _cfg(target_modules=["norm", "stem"]))
    assert [n for n, _ in flora_layers(model)] == ["stem"]
    with pytest.warns(UserWarning, match="'norm'"), pytest.raises(ValueError, match="matched no supported module"):
        fk.inject_flora(Net(), _cfg(target_modules=["norm"]))
    del before


def test_inject_twice_and_bad_config():
    model = fk.inject_flora(Net(), _cfg(target_modules=["stem"]))
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        fk.inject_flora(model, _cfg(target_modules=["fc1"]))
    fk.inject_flora(model, _cfg(target_modules=["fc1"]), adapter_name="second")  # a new name is a new adapter
    assert fk.active_adapters(model) == ["second"]
    with pytest.raises(TypeError, match=r"cfg: expected a FLoRAConfig, got dict"):
        fk.inject_flora(Net(), {"rank": 4})


def test_inject_shares_and_freezes():
    model = Net()
    refs = {n: (m.weight, m.weight.data_ptr()) for n, m in model.named_modules() if n in ALL_SUPPORTED}
    fk.inject_flora(model, _cfg(target_modules=ALL_SUPPORTED, modules_to_save=["norm"]))
    for n, (w, ptr) in refs.items():
        layer = model.get_submodule(n)
        assert isinstance(layer, FLoRALayer)
        assert layer.base.weight is w and layer.base.weight.data_ptr() == ptr
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    want = sorted([f"{n}.flora_core.default" for n in ALL_SUPPORTED] + [f"{n}.flora_u{i}.default" for n in ALL_SUPPORTED
                   for i in range(len(model.get_submodule(n).factors))] + ["norm.weight", "norm.bias"])
    assert trainable == want


def test_training_step_changes_only_trainable():
    torch.manual_seed(1)
    model = fk.inject_flora(Net(), _cfg(target_modules=["stem", "blocks.0", "fc1"], modules_to_save=["head"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(_x()).square().mean().backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable
    # at the paper's init dW = 0, so only the cores (and the saved head) get a gradient
    assert {"stem.flora_core.default", "blocks.0.flora_core.default", "fc1.flora_core.default", "head.weight", "head.bias"} <= changed


# --- merge / unload -----------------------------------------------------------------------------


def test_merge_unmerge_model():
    _, model = _adapted()
    x = _x()
    w0 = {n: l.base.weight.detach().clone() for n, l in flora_layers(model)}
    with torch.no_grad():
        y = model(x)
        fk.merge_flora(model)
        assert all(l.merged for _, l in flora_layers(model))
        assert_rel_close(model(x), y, 1e-5, msg="merged")
        fk.unmerge_flora(model)
        for n, l in flora_layers(model):
            assert not l.merged
            assert_close(l.base.weight, w0[n], torch.float32, msg=n)
        assert_rel_close(model(x), y, 1e-5, msg="unmerged")


def test_merge_and_unload():
    _, model = _adapted()
    x = _x()
    with torch.no_grad():
        y = model(x)
        plain = fk.merge_and_unload(model)
    assert not flora_layers(plain) and not hasattr(plain, "flora_config")
    assert type(plain.stem) is nn.Conv2d and type(plain.fc1) is nn.Linear and type(plain.seq) is nn.Conv1d
    assert all(type(m).__module__.startswith("torch.") for m in plain.modules() if m is not plain)
    with torch.no_grad():
        assert_rel_close(plain(x), y, 1e-5)


# --- save / load -------------------------------------------------------------------------------


def test_save_load_roundtrip_exact(tmp_path):
    orig, model = _adapted(target_modules=["stem", "blocks.0", "seq", "fc1"], modules_to_save=["head"], scale=0.5)
    with torch.no_grad():
        model.head.weight.add_(1.0)  # a trained head
    fk.save_flora(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(meta["layer_info"]) == ["blocks.0", "fc1", "seq", "stem"] and meta["peft_type"] == "FLORA"
    assert os.path.exists(tmp_path / "adapter_model.safetensors")
    fresh = fk.load_flora(copy.deepcopy(orig), tmp_path)
    x = _x()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert torch.equal(fresh.head.weight, model.head.weight)
    assert fresh.head.weight.requires_grad and fresh.stem.core.requires_grad
    assert not fresh.stem.base.weight.requires_grad and not fresh.fc1.base.bias.requires_grad
    assert fresh.flora_config == model.flora_config
    # and into a model that already has matching (fresh-init) adapters
    again = fk.inject_flora(copy.deepcopy(orig), model.flora_config)
    fk.load_flora(again, tmp_path)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_load_wrong_shape_leaves_model_unchanged(tmp_path):
    _, model = _adapted(target_modules=["fc1", "stem"])
    fk.save_flora(model, tmp_path)
    other = Net(hidden=12)  # fc1 is 8 -> 12 instead of 8 -> 16
    before = _state(other)
    with pytest.raises(ValueError, match=r"'fc1'.*\(16, 8\).*\(12, 8\)"):
        fk.load_flora(other, tmp_path)
    assert not flora_layers(other) and _same_state(before, _state(other))


def test_load_wrong_ranks_or_missing_module(tmp_path):
    orig, model = _adapted(target_modules=["fc1", "stem"])
    fk.save_flora(model, tmp_path)
    injected = fk.inject_flora(copy.deepcopy(orig), _cfg(target_modules=["fc1", "stem"], rank=2))
    before = _state(injected)
    with pytest.raises(ValueError, match=r"'(fc1|stem)': saved ranks \(3, 3.*the model's layer has \(2, 2"):
        fk.load_flora(injected, tmp_path)
    assert _same_state(before, _state(injected))

    class NoFc(Net):
        def __init__(self) -> None:
            super().__init__()
            del self.fc1

    nofc = NoFc()
    before = _state(nofc)
    with pytest.raises(ValueError, match=r"adapter module 'fc1' not found in the model"):
        fk.load_flora(nofc, tmp_path)
    assert not flora_layers(nofc) and _same_state(before, _state(nofc))


def test_load_bad_tensor_shape_names_key(tmp_path):
    """A modules_to_save tensor of the wrong shape: the key and both shapes are named."""
    orig, model = _adapted(target_modules=["stem"], modules_to_save=["fc1"])
    fk.save_flora(model, tmp_path)
    other = Net(hidden=12)
    other.stem = copy.deepcopy(orig.stem)
    before = _state(other)
    with pytest.raises(ValueError, match=r"fc1\.weight: expected shape \(12, 8\), the file has \(16, 8\)"):
        fk.load_flora(other, tmp_path)
    assert not flora_layers(other) and _same_state(before, _state(other))


def test_save_without_adapters_fails(tmp_path):
    with pytest.raises(ValueError, match="no FLoRA adapters"):
        fk.save_flora(Net(), tmp_path)


# --- summary, disable, scale -------------------------------------------------------------------


def test_param_summary_counts():
    model = fk.inject_flora(Net(), _cfg(target_modules=["stem", "fc1"], rank=2, modules_to_save=["head"]))
    base_total = sum(p.numel() for p in Net().parameters())
    stem = 2 * 2 * 3 * 3 + 8 * 2 + 3 * 2 + 3 * 3 + 3 * 3  # core (2,2,3,3) + factors
    fc1 = 2 * 2 + 16 * 2 + 8 * 2
    head = 16 * 5 + 5
    s = fk.param_summary(model)
    assert s == fk.ParamSummary(trainable=stem + fc1 + head, total=base_total + stem + fc1, adapter=stem + fc1)
    assert f"{s.trainable:,}" in str(s)


def test_disable_adapter_context():
    orig, model = _adapted(target_modules=["stem", "fc1", "seq"])
    x = _x()
    with torch.no_grad():
        y, y0 = model(x), orig(x)
        assert not torch.allclose(y, y0)
        with fk.disable_adapter(model) as m:
            assert m is model and torch.equal(model(x), y0)
        assert torch.equal(model(x), y)
        # merged: unmerged by disabling and left unmerged after (PEFT's behaviour)
        fk.merge_flora(model)
        ym = model(x)
        with fk.disable_adapter(model):
            assert_rel_close(model(x), y0, 1e-5)
            assert not any(l.merged for _, l in flora_layers(model))
        assert not any(l.merged for _, l in flora_layers(model))
        assert_rel_close(model(x), ym, 1e-5)
        # the block raises: state restored anyway
        with pytest.raises(RuntimeError, match="boom"):
            with fk.disable_adapter(model):
                raise RuntimeError("boom")
        assert all(l.adapter_enabled and not l.merged for _, l in flora_layers(model))
        assert_rel_close(model(x), y, 1e-5)


def test_set_adapter_scale():
    orig, model = _adapted(target_modules=["fc1"], scale=1.0)
    h = torch.randn(4, 8)
    layer = model.fc1
    with torch.no_grad():
        fk.set_adapter_scale(model, 2.5)
        assert layer.scale == 2.5
        dw = einsum_reconstruct(layer.core, list(layer.factors), 2.5)
        want = orig.fc1(h) + h @ dw.t()
        assert_rel_close(layer(h), want, 1e-5)
        fk.merge_flora(model)
        fk.set_adapter_scale(model, -1.0)
        assert layer.merged and layer.scale == -1.0
        dw = einsum_reconstruct(layer.core, list(layer.factors), -1.0)
        assert_close(layer.base.weight, orig.fc1.weight + dw, torch.float32, atol=1e-5)
    with pytest.raises(TypeError, match="scale: expected a float, got str"):
        fk.set_adapter_scale(model, "2")


# --- regressions: bugs found and fixed in load_flora ------------------------------------------


def test_load_into_injected_model_restores_saved_scale(tmp_path):
    orig, model = _adapted(target_modules=["fc1"])
    fk.set_adapter_scale(model, 2.5)
    fk.save_flora(model, tmp_path)
    pre = fk.inject_flora(copy.deepcopy(orig), _cfg(target_modules=["fc1"]))  # scale 1.0
    fk.load_flora(pre, tmp_path)
    x = _x()
    with torch.no_grad():
        assert torch.equal(pre(x), model(x))


def test_load_modules_to_save_into_injected_model_without_them(tmp_path):
    orig, model = _adapted(target_modules=["fc1"], modules_to_save=["head"])
    fk.save_flora(model, tmp_path)
    pre = fk.inject_flora(copy.deepcopy(orig), _cfg(target_modules=["fc1"]))
    before = _state(pre)
    try:
        fk.load_flora(pre, tmp_path)
    except ValueError:
        assert _same_state(before, _state(pre)), "a failed load changed the model"
        return
    x = _x()
    with torch.no_grad():
        assert torch.equal(pre(x), model(x))

"""Named adapters: add / set / delete, weighted combination, mixed batches, save/load of many."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import flora_kernels as fk
from flora_kernels.layers import flora_layers

ATOL = RTOL = 1e-5


class Net(nn.Module):
    """Conv2d -> Linear, plus an embedding-indexed bias and a ConvTranspose, for every type."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x, ids):
        h = self.conv(x) + self.emb(ids)[:, :, None, None]
        h = self.up(torch.relu(h)).mean(dim=(2, 3))
        return self.fc(h)


def inputs(n: int = 4):
    return torch.randn(n, 3, 5, 5), torch.randint(0, 10, (n,))


def randomize(model: nn.Module, name: str) -> None:
    with torch.no_grad():
        for _, layer in flora_layers(model):
            if name in layer.flora_settings:
                core, factors = layer.tensors(name)
                core.normal_(0, 0.4)
                for f in factors:
                    f.normal_(0, 0.5)


def two_adapters():
    torch.manual_seed(0)
    model = Net()
    targets = ["emb", "conv", "up", "fc"]
    fk.inject_flora(model, fk.FLoRAConfig(rank=2, target_modules=targets))
    fk.add_adapter(model, "b", fk.FLoRAConfig(rank=3, scale=0.5, target_modules=["conv", "fc", "emb", "up"]))
    randomize(model, "default")
    randomize(model, "b")
    return model


def test_names_in_state_dict_and_grad_flags():
    model = two_adapters()
    keys = set(model.state_dict())
    assert {"fc.flora_core.default", "fc.flora_u0.default", "fc.flora_u1.b", "conv.flora_u3.b"} <= keys
    assert fk.active_adapters(model) == ["default"]
    assert model.fc.flora_core["default"].requires_grad and not model.fc.flora_core["b"].requires_grad
    fk.set_adapter(model, ["default", "b"])
    assert model.fc.flora_core["b"].requires_grad
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


def test_several_active_adapters_are_summed():
    model = two_adapters()
    x, ids = inputs()
    base = copy.deepcopy(model)
    fk.set_adapter(model, ["default", "b"])
    y = model(x, ids)
    with torch.no_grad():
        for (_, src), (_, dst) in zip(flora_layers(model), flora_layers(base)):
            dst.base_layer.weight += src._modes_to_stored(src.delta_weight("default") + src.delta_weight("b"))
    with fk.disable_adapter(base):
        want = base(x, ids)
    torch.testing.assert_close(y, want, atol=ATOL, rtol=RTOL)
    fk.merge_flora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x, ids), y, atol=ATOL, rtol=RTOL)
    fk.unmerge_flora(model)


def test_delete_adapter():
    model = two_adapters()
    fk.delete_adapter(model, "b")
    assert "fc.flora_core.b" not in model.state_dict()
    with pytest.raises((KeyError, ValueError)):
        fk.set_adapter(model, "b")


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, -2.0)])
def test_add_weighted_adapter_is_exact(weights):
    model = two_adapters()
    fk.add_weighted_adapter(model, ["default", "b"], list(weights), "mix")
    for _, layer in flora_layers(model):
        want = weights[0] * layer.delta_weight("default") + weights[1] * layer.delta_weight("b")
        torch.testing.assert_close(layer.delta_weight("mix"), want, atol=1e-5, rtol=1e-5)
        # the conv's kernel modes (3 + 3 > 3) and the embedding's r=5 <= 6 are re-decomposed where needed
        for r, i in zip(layer.flora_settings["mix"].ranks, layer.weight_modes().shape):
            assert r <= i
    x, ids = inputs()
    fk.set_adapter(model, "mix")
    y = model(x, ids)
    fk.set_adapter(model, ["default", "b"])
    if weights == (1.0, 1.0):
        torch.testing.assert_close(model(x, ids), y, atol=ATOL, rtol=RTOL)


def test_mixed_batch_matches_each_sample_alone():
    model = two_adapters()
    x, ids = inputs(5)
    names = ["b", None, "default", "b", "default"]
    with fk.adapter_batch(model, names):
        y = model(x, ids)
    for i, n in enumerate(names):
        if n is None:
            with fk.disable_adapter(model):
                want = model(x[i : i + 1], ids[i : i + 1])
        else:
            fk.set_adapter(model, n)
            want = model(x[i : i + 1], ids[i : i + 1])
        torch.testing.assert_close(y[i : i + 1], want, atol=ATOL, rtol=RTOL)
    y.sum().backward()  # differentiable


def test_mixed_batch_multihead_attention():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    fk.inject_flora(model, fk.FLoRAConfig(rank=2, target_modules=["self_attn", "out_proj", "linear1"]))
    fk.add_adapter(model, "b", fk.FLoRAConfig(rank=2, target_modules=["self_attn", "out_proj", "linear1"]))
    randomize(model, "default")
    randomize(model, "b")
    x = torch.randn(3, 4, 8)
    names = ["b", "default", None]
    with fk.adapter_batch(model, names):
        y = model(x)
    for i, n in enumerate(names):
        if n is None:
            with fk.disable_adapter(model):
                want = model(x[i : i + 1])
        else:
            fk.set_adapter(model, n)
            want = model(x[i : i + 1])
        torch.testing.assert_close(y[i : i + 1], want, atol=ATOL, rtol=RTOL)


def test_mixed_batch_rejects_unknown_names():
    model = two_adapters()
    with pytest.raises(KeyError):
        with fk.adapter_batch(model, ["nope"]):
            pass


def test_save_load_every_adapter(tmp_path):
    model = two_adapters()
    fk.save_flora(model, tmp_path)
    assert os.path.isfile(tmp_path / "adapter_config.json") and os.path.isfile(tmp_path / "b" / "adapter_config.json")
    torch.manual_seed(0)
    fresh = Net()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "flora_" not in k})
    fk.load_flora(fresh, tmp_path)
    assert fk.active_adapters(fresh) == ["default"]
    x, ids = inputs()
    for active in (["default"], ["b"], ["default", "b"]):
        fk.set_adapter(model, active)
        fk.set_adapter(fresh, active)
        torch.testing.assert_close(fresh(x, ids), model(x, ids), atol=0, rtol=0)


def test_load_one_named_adapter(tmp_path):
    model = two_adapters()
    fk.save_flora(model, tmp_path, adapter_name="b")
    assert not os.path.exists(tmp_path / "adapter_config.json")
    fresh = copy.deepcopy(model)
    fk.delete_adapter(fresh, "b")
    fk.load_flora(fresh, tmp_path, adapter_name="b")
    for _, layer in flora_layers(fresh):
        assert "b" in layer.flora_settings
    with torch.no_grad():
        fresh.fc.flora_core["b"].zero_()
    fk.load_flora(fresh, tmp_path, adapter_name="b")  # in place: the saved tensors come back
    assert torch.equal(fresh.fc.flora_core["b"], model.fc.flora_core["b"])

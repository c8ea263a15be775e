"""extract_flora (full fine-tune -> FLoRA), the flora-extract CLI on state-dict files, rerank_flora.

The tuned models are the base plus Tucker deltas of known multilinear rank (built with an
einsum, tests/helpers.py), so extraction at those ranks must reproduce the tuned model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import einsum_reconstruct, rel_error
from safetensors.torch import save_file
from torch import nn

import flora_kernels as fk
from flora_kernels.convert.cli import main as extract_main
from flora_kernels.convert.extract import rerank_flora
from flora_kernels.convert.lycoris import import_lycoris
from flora_kernels.decompose import tucker_decompose
from flora_kernels.layers import flora_layers

ATOL = RTOL = 1e-5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 10, 3, padding=1)
        self.gconv = nn.Conv2d(10, 10, 3, padding=1, groups=2)
        self.c1 = nn.Conv1d(10, 9, 3, padding=1)
        self.fc = nn.Linear(9, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.gconv(torch.tanh(self.conv(x))))
        x = torch.tanh(self.c1(x.flatten(2)).mean(-1))
        return self.head(torch.tanh(self.fc(x)))


TRUE_RANKS = {"conv": (3, 2, 2, 2), "gconv": (2, 3, 2, 1), "c1": (3, 3, 2), "fc": (2, 3)}


def tuned_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    gen = torch.Generator().manual_seed(seed)
    base = Net().eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, ranks in TRUE_RANKS.items():
            w = tuned.get_submodule(name).weight
            core = torch.randn(ranks, generator=gen)
            fs = [torch.randn(i, r, generator=gen) / r**0.5 for i, r in zip(w.shape, ranks)]
            w.add_(0.3 * einsum_reconstruct(core, fs))
    return base, tuned


def x_input() -> torch.Tensor:
    return torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(9))


def test_extract_recovers_tuned_model_at_true_ranks(capsys):
    base, tuned = tuned_pair()
    model = fk.extract_flora(copy.deepcopy(base), tuned, rank=3, kernel_rank=2, backend="reference").eval()
    layers = dict(flora_layers(model))
    assert set(layers) == set(TRUE_RANKS)  # head unchanged: no adapter
    report = model.flora_extraction
    assert report.unchanged == ["head"] and report.not_captured == {}
    assert layers["conv"].ranks == (3, 3, 2, 2) and layers["fc"].ranks == (3, 3)
    for r in report.layers:
        assert r.rel_error < 1e-5 and abs(r.energy - 1) < 1e-5, r
        assert r.ranks == layers[r.name].ranks
        assert r.params == layers[r.name].core.numel() + sum(f.numel() for f in layers[r.name].factors)
        delta = tuned.get_submodule(r.name).weight - base.get_submodule(r.name).weight
        torch.testing.assert_close(layers[r.name].delta_weight(), delta, atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        torch.testing.assert_close(model(x_input()), tuned(x_input()), atol=ATOL, rtol=RTOL)
    assert "extract_flora" in capsys.readouterr().err  # the progress bar
    assert "conv" in str(report) and "4 adapters" in str(report)
    assert fk.param_summary(model).trainable == sum(r.params for r in report.layers)


def test_extract_below_true_rank_matches_tucker_decompose_and_lists_uncaptured():
    base, tuned = tuned_pair()
    with torch.no_grad():
        tuned.fc.bias.add_(1.0)
    sd = tuned.state_dict()
    model = fk.extract_flora(copy.deepcopy(base), sd, rank=1, kernel_rank=1, target_modules=["conv", "fc"],
                             progress=False)
    report = model.flora_extraction
    assert [r.name for r in report.layers] == ["conv", "fc"]
    assert set(report.not_captured) == {"gconv.weight", "c1.weight", "fc.bias"}
    for r in report.layers:
        delta = sd[f"{r.name}.weight"] - base.get_submodule(r.name).weight
        core, factors = tucker_decompose(delta, r.ranks)
        expected = rel_error(einsum_reconstruct(core, factors), delta)
        assert 0 < r.rel_error == pytest.approx(expected, rel=1e-4)
        assert r.energy == pytest.approx(1 - expected**2, rel=1e-4)


def test_extract_energy_ranks():
    base = nn.Sequential(nn.Linear(10, 8)).eval()
    tuned = copy.deepcopy(base)
    u, _ = torch.linalg.qr(torch.randn(8, 4))
    v, _ = torch.linalg.qr(torch.randn(10, 4))
    s = torch.tensor([10.0, 3.0, 1.0, 0.1])  # energy fractions 0.909, 0.991, 0.9999, 1
    with torch.no_grad():
        tuned[0].weight.add_(u @ torch.diag(s) @ v.T)
    for energy, ranks in [(0.9, (1, 1)), (0.95, (2, 2)), (0.995, (3, 3))]:
        model = fk.extract_flora(copy.deepcopy(base), tuned, rank=None, energy=energy, progress=False)
        (r,) = model.flora_extraction.layers
        assert r.ranks == ranks and r.energy >= energy - 1e-6
    capped = fk.extract_flora(copy.deepcopy(base), tuned, rank=2, energy=0.9999, progress=False)
    assert capped.flora_extraction.layers[0].ranks == (2, 2)


def test_extract_errors_leave_model_untouched():
    base, tuned = tuned_pair()
    sd = tuned.state_dict()
    target = copy.deepcopy(base)
    with pytest.raises(ValueError, match="give rank, energy or both"):
        fk.extract_flora(target, tuned, rank=None)
    with pytest.raises(ValueError, match=r"tuned: missing 'fc.weight' \(shape \(12, 9\)\)"):
        fk.extract_flora(target, {k: v for k, v in sd.items() if k != "fc.weight"})
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(12, 10\), the base model's is \(12, 9\)"):
        fk.extract_flora(target, {**sd, "fc.weight": torch.randn(12, 10)})
    with pytest.raises(ValueError, match="no targeted weight differs"):
        fk.extract_flora(target, base.state_dict(), progress=False)
    with pytest.raises(ValueError, match="without FLoRA layers"):
        fk.extract_flora(target, fk.inject_flora(copy.deepcopy(base), fk.FLoRAConfig(rank=1)))
    assert not flora_layers(target) and not hasattr(target, "flora_extraction")


def test_cli_on_state_dict_files_flora_and_kohya(tmp_path, capsys):
    base, tuned = tuned_pair(seed=1)
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    torch.save({"state_dict": tuned.state_dict()}, tmp_path / "tuned.pt")
    files = [str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.pt")]
    x = x_input()
    with torch.no_grad():
        expected = tuned(x)

    assert extract_main([*files, "--rank", "3", "--kernel-rank", "2", "--out", str(tmp_path / "flora")]) == 0
    assert "4 adapters" in capsys.readouterr().out
    report = json.loads((tmp_path / "flora" / "extract_report.json").read_text())
    assert [r["name"] for r in report["layers"]] == sorted(TRUE_RANKS) and report["unchanged"] == ["head"]
    model = fk.load_flora(copy.deepcopy(base), tmp_path / "flora").eval()  # the real model class
    assert dict(flora_layers(model))["conv"].ranks == (3, 3, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=RTOL)

    out = tmp_path / "kohya" / "unet.safetensors"
    args = [*files, "--rank", "3", "--kernel-rank", "2", "--out", str(out), "--format", "kohya",
            "--prefix", "lora_unet", "--quiet"]
    assert extract_main(args) == 0
    assert (tmp_path / "kohya" / "extract_report.json").exists()
    model = import_lycoris(copy.deepcopy(base), out, prefix="lora_unet").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=RTOL)


def test_cli_energy_target_and_errors(tmp_path, capsys):
    base, tuned = tuned_pair(seed=2)
    save_file(base.state_dict(), str(tmp_path / "b.safetensors"))
    save_file(tuned.state_dict(), str(tmp_path / "t.safetensors"))
    files = [str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors")]
    assert extract_main([*files, "--energy", "1.0", "--target", "fc", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    report = json.loads((tmp_path / "o" / "extract_report.json").read_text())
    assert [(r["name"], tuple(r["ranks"])) for r in report["layers"]] == [("fc", (2, 2))]  # delta rank 2
    with pytest.raises(SystemExit):
        extract_main([*files, "--out", str(tmp_path / "o2")])
    assert "give --rank, --energy or both" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nope.safetensors: no such file"):
        extract_main([str(tmp_path / "nope.safetensors"), files[1], "--rank", "2", "--out", str(tmp_path / "o3")])


def flora_with_low_rank_core(base: nn.Module) -> nn.Module:
    """FLoRA rank 6 whose core has multilinear rank 2 in the channel modes (exactly re-rankable)."""
    model = fk.inject_flora(copy.deepcopy(base), fk.FLoRAConfig(
        rank=6, target_modules=["conv", "fc"], modules_to_save=["head"], scale=0.5, backend="reference"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in flora_layers(model):
            r = layer.core.shape
            small = torch.randn(2, 2, *r[2:], generator=gen)
            layer.core.copy_(einsum_reconstruct(small, [torch.randn(r[0], 2, generator=gen),
                                                        torch.randn(r[1], 2, generator=gen),
                                                        *[torch.eye(k) for k in r[2:]]]))
            for f in layer.factors:
                f.copy_(torch.randn(f.shape, generator=gen))
        model.head.weight.add_(1.0)
    return model.eval()


def test_rerank_exact_at_true_rank_and_keeps_the_rest():
    base, _ = tuned_pair()
    model = flora_with_low_rank_core(base)
    x = x_input()
    with torch.no_grad():
        before = model(x)
        deltas = {n: layer.delta_weight() for n, layer in flora_layers(model)}
    rerank_flora(model, rank=2)
    layers = dict(flora_layers(model))
    assert layers["conv"].ranks == (2, 2, 3, 3) and layers["fc"].ranks == (2, 2)
    assert all(layer.scale == 0.5 for layer in layers.values())
    for name, layer in layers.items():
        torch.testing.assert_close(layer.delta_weight(), deltas[name], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=ATOL, rtol=RTOL)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable and "conv.base.weight" not in trainable
    assert "head" in model.flora_config.modules_to_save


def test_rerank_compresses_like_dense_decomposition_and_energy():
    base, _ = tuned_pair()
    model = fk.inject_flora(copy.deepcopy(base), fk.FLoRAConfig(rank=6, target_modules=["conv"]))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        layer = dict(flora_layers(model))["conv"]
        layer.core.copy_(torch.randn(layer.core.shape, generator=gen))
        for f in layer.factors:
            f.copy_(torch.randn(f.shape, generator=gen))
        dense = layer.delta_weight()
    rerank_flora(model, rank=3, kernel_rank=2, method="hosvd")
    new = dict(flora_layers(model))["conv"]
    assert new.ranks == (3, 3, 2, 2)
    ref = tucker_decompose(dense, (3, 3, 2, 2), "hosvd", randomized=False)
    torch.testing.assert_close(new.delta_weight(), einsum_reconstruct(*ref), atol=1e-4, rtol=1e-4)
    rerank_flora(model, energy=0.5)
    assert all(r <= r0 for r, r0 in zip(dict(flora_layers(model))["conv"].ranks, (3, 3, 2, 2)))
    with pytest.raises(ValueError, match="give rank, kernel_rank or energy"):
        rerank_flora(model)


def test_rerank_imported_lycoris_adapter():
    base, _ = tuned_pair()
    gen = torch.Generator().manual_seed(6)
    state = {
        "lycoris_fc.lora_down.weight": torch.randn(5, 9, generator=gen),
        "lycoris_fc.lora_up.weight": torch.randn(12, 5, generator=gen),
        "lycoris_fc.alpha": torch.tensor(5.0),
    }
    model = import_lycoris(copy.deepcopy(base), state)
    dense = dict(flora_layers(model))["fc"].delta_weight()
    rerank_flora(model, rank=2)
    layer = dict(flora_layers(model))["fc"]
    u, s, vh = torch.linalg.svd(dense.double())
    best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]  # a matrix: HOOI = truncated SVD
    assert layer.ranks == (2, 2)
    torch.testing.assert_close(layer.delta_weight().double(), best, atol=1e-4, rtol=1e-4)


def test_rerank_imported_peft_adapter_with_rank_above_the_layer():
    from flora_kernels.convert.peft import import_peft

    base, _ = tuned_pair()
    gen = torch.Generator().manual_seed(7)
    state = {  # PEFT keys without the peft package; r = 8 > head's 3 outputs
        "base_model.model.head.lora_A.weight": torch.randn(8, 12, generator=gen),
        "base_model.model.head.lora_B.weight": torch.randn(3, 8, generator=gen),
        "base_model.model.conv.lora_A.weight": torch.randn(8, 4, 3, 3, generator=gen),
        "base_model.model.conv.lora_B.weight": torch.randn(10, 8, 1, 1, generator=gen),
    }
    model = import_peft(copy.deepcopy(base), state, {"r": 8, "lora_alpha": 4})
    layers = dict(flora_layers(model))
    assert layers["head"].ranks == (3, 3) and layers["conv"].ranks == (8, 4, 3, 3)
    dense = {n: layer.delta_weight() for n, layer in layers.items()}
    rerank_flora(model, rank=2, kernel_rank=3)
    layers = dict(flora_layers(model))
    assert layers["head"].ranks == (2, 2) and layers["conv"].ranks == (2, 2, 3, 3)
    for name, layer in layers.items():
        ref = tucker_decompose(dense[name], layer.ranks)
        err, best = rel_error(layer.delta_weight(), dense[name]), rel_error(einsum_reconstruct(*ref), dense[name])
        assert err <= best * 1.01 + 1e-6, (name, err, best)

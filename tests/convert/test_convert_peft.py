"""PEFT LoRA <-> FLoRA converters, proven against the real ``peft`` package's own modules.

Export: a FLoRA model's adapters written with ``export_peft`` are loaded by
``peft.PeftModel.from_pretrained`` on a copy of the same base model; both models must compute
the same outputs. Import: a PEFT LoRA model (random non-zero lora_B) saved with
``save_pretrained`` is imported with ``import_peft``; outputs must match PEFT's.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import flora_kernels as fk
from flora_kernels.convert.peft import export_peft, import_peft, to_peft
from flora_kernels.layers import flora_layers

peft = pytest.importorskip("peft")

ATOL = RTOL = 2e-5


class Net(nn.Module):
    """Linear + Conv1d/2d (strided, 1x1, grouped, 'same' padding) + a head for modules_to_save."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.pw = nn.Conv2d(8, 8, 1)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.c1 = nn.Conv1d(8, 8, 3, padding="same")
        self.fc = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.gconv(torch.tanh(self.pw(self.conv(x)))))
        x = self.c1(x.flatten(2)).mean(-1)
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc(x)))))


ADAPTED = ["conv", "pw", "gconv", "c1", "fc", "fc2"]


@pytest.fixture
def base() -> Net:
    return Net().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8)


@torch.no_grad()
def randomize(model: nn.Module, scale: float = 0.3) -> None:
    for _, layer in flora_layers(model):
        layer.core.normal_(0.0, scale)
        for f in layer.factors:
            f.normal_(0.0, 0.5)


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool], str]:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {k: p.requires_grad for k, p in model.named_parameters()},
        repr(model),
    )


def assert_unchanged(model: nn.Module, snap) -> None:
    state, grads, text = snap
    assert not flora_layers(model)
    assert not hasattr(model, "flora_config")
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    assert repr(model) == text


def load_peft(base: nn.Module, path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # grouped-conv "merging is not supported" etc.
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


def flora_model(base: nn.Module, rank, scale: float = 0.3, kernel_rank=2, saved=("head",)) -> nn.Module:
    model = fk.inject_flora(
        copy.deepcopy(base),
        fk.FLoRAConfig(rank=rank, kernel_rank=kernel_rank, scale=scale, target_modules=ADAPTED,
                       modules_to_save=saved, backend="reference"),
    )
    randomize(model)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn_like(p))
    return model.eval()


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("rank,scale", [((3, 2), 0.3), ((2, 3), 1.7)], ids=["rout>rin-s0.3", "rout<rin-s1.7"])
def test_export_loads_in_peft_with_same_outputs(base, x, tmp_path, rank, scale):
    model = flora_model(base, rank, scale)
    cfg = export_peft(model, tmp_path)
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk["peft_type"] == "LORA" and on_disk["modules_to_save"] == ["head"]
    assert cfg["rank_pattern"], "ranks differ across modules: rank_pattern must be used"
    pm = load_peft(base, tmp_path)
    # PEFT built exactly the layers we exported, with our ranks and scalings.
    _, tensors = to_peft(model)
    for name in ADAPTED:
        lora = pm.base_model.model.get_submodule(name)
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        assert lora.r["default"] == a.shape[0], name
        torch.testing.assert_close(lora.lora_A["default"].weight, a)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), atol=ATOL, rtol=RTOL)


def test_export_scale_is_exact_in_peft(base, tmp_path):
    """alpha/r reproduces s exactly, or s is folded into B with alpha = r (scaling 1)."""
    model = flora_model(base, (3, 2), scale=0.3)
    export_peft(model, tmp_path)
    pm = load_peft(base, tmp_path)
    for name, layer in flora_layers(model):
        scaling = pm.base_model.model.get_submodule(name).scaling["default"]
        assert scaling in (layer.scale, 1.0), (name, scaling)


def test_export_then_import_round_trip(base, x, tmp_path):
    model = flora_model(base, (3, 2), scale=0.3)
    export_peft(model, tmp_path)
    back = import_peft(copy.deepcopy(base), tmp_path, backend="reference")
    assert {n for n, _ in flora_layers(back)} == set(ADAPTED)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=ATOL, rtol=RTOL)


def test_export_rejects_dilated_conv_and_merged(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2, padding=2))
    fk.inject_flora(net, fk.FLoRAConfig(rank=2, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"dilation \(2, 2\)"):
        export_peft(net, tmp_path)
    net2 = fk.inject_flora(nn.Sequential(nn.Linear(4, 4)), fk.FLoRAConfig(rank=2))
    fk.merge_flora(net2)
    with pytest.raises(ValueError, match="unmerge_flora"):
        export_peft(net2, tmp_path)


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(4, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.dw(torch.tanh(self.pw(x)))).mean((2, 3)))


def depthwise_model() -> tuple[nn.Module, nn.Module]:
    base = Depthwise().eval()
    model = fk.inject_flora(copy.deepcopy(base), fk.FLoRAConfig(rank=2, kernel_rank=2, backend="reference"))
    randomize(model)
    return base, model.eval()


def test_export_size_estimate_matches_what_is_written():
    from flora_kernels.convert.peft import peft_size

    for base, model in [(None, flora_model(Net().eval(), (3, 2))), depthwise_model()]:
        _, tensors = to_peft(model, oversized="write")
        for name, layer in flora_layers(model):
            sz = peft_size(layer)
            a, b = (tensors[f"base_model.model.{name}.lora_{s}.weight"] for s in "AB")
            assert (tuple(a.shape), tuple(b.shape)) == (sz.lora_a, sz.lora_b), name
            assert sz.peft == a.numel() + b.numel()
            assert sz.flora == layer.core.numel() + sum(f.numel() for f in layer.factors)


def test_export_refuses_oversized_grouped_conv(tmp_path):
    _, model = depthwise_model()
    with pytest.raises(ValueError) as err:
        export_peft(model, tmp_path / "out")
    msg = str(err.value)
    # dw: PEFT lora_A (64, 32, 3, 3) + lora_B (32, 2, 1, 1) = 18496 elements vs FLoRA 2*32+1*1+2*1*2*2+2*3*2 = 85.
    assert "1 module(s) would be more than 64x their FLoRA adapter" in msg
    assert "dw (Conv2d (32, 1, 3, 3), groups=32): PEFT lora_A (64, 32, 3, 3) + lora_B (32, 2, 1, 1)" in msg
    assert "(218x)" in msg and "fk.save_flora" in msg and "export_lycoris" in msg and "oversized='skip'" in msg
    assert not (tmp_path / "out").exists()  # nothing written
    cfg = export_peft(model, tmp_path / "out", max_size_ratio=300)  # the threshold is a parameter
    assert cfg["exclude_modules"] is None


@pytest.mark.parametrize("mode", ["write", "skip"])
def test_export_oversized_write_or_skip(tmp_path, mode):
    base, model = depthwise_model()
    cfg = export_peft(model, tmp_path, oversized=mode)
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk["exclude_modules"] == cfg["exclude_modules"] == (["dw"] if mode == "skip" else None)
    pm = load_peft(base, tmp_path)
    x = torch.randn(2, 4, 5, 5)
    if mode == "skip":
        dict(flora_layers(model))["dw"].adapter_enabled = False  # the function PEFT now computes
    with torch.no_grad():
        torch.testing.assert_close(pm(x), model(x), atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="oversized: expected one of"):
        to_peft(model, oversized="ignore")


# ----------------------------------------------------------------------------- import


def peft_model(base: nn.Module, targets, **kw) -> nn.Module:
    cfg = peft.LoraConfig(target_modules=targets, init_lora_weights=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)  # non-zero adapters
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p))
    return pm.eval()


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_import_matches_peft(base, x, tmp_path, rslora):
    targets = ["conv", "pw", "c1", "fc", "fc2"]
    kw = {"r": 4, "lora_alpha": 6, "modules_to_save": ["head"], "use_rslora": rslora}
    if not rslora:
        kw.update(rank_pattern={"fc2": 2}, alpha_pattern={"fc2": 3.0})
    pm = peft_model(base, targets, **kw)
    pm.save_pretrained(str(tmp_path))
    model = import_peft(copy.deepcopy(base), tmp_path, backend="reference").eval()
    layers = dict(flora_layers(model))
    assert set(layers) == set(targets)
    assert layers["conv"].ranks == (4, 4, 3, 3)  # input and kernel ranks grow to full size
    assert layers["fc2"].ranks == ((2, 2) if not rslora else (4, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(x), atol=ATOL, rtol=RTOL)
    # Like inject_flora: only adapters and modules_to_save train.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{t}.flora_core.default" for t in targets} | {"head.weight", "head.bias"}
    expected |= {f"{t}.flora_u{i}.default" for t, layer in layers.items() for i in range(len(layer.factors))}
    assert trainable == expected


def test_import_state_dict_with_config_object(base, x):
    pm = peft_model(base, ["fc", "conv"], r=2, lora_alpha=5)
    state = peft.get_peft_model_state_dict(pm)
    model = import_peft(copy.deepcopy(base), state, pm.peft_config["default"], backend="reference").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(x), atol=ATOL, rtol=RTOL)


def test_import_grouped_dense_lora_raises_and_leaves_model(base, tmp_path):
    pm = peft_model(base, ["gconv"], r=4, lora_alpha=4)
    pm.save_pretrained(str(tmp_path))
    target = copy.deepcopy(base)
    snap = snapshot(target)
    with pytest.raises(ValueError, match=r"gconv\.lora_A\.weight.*\(4, 8, 3, 3\).*mixes input channels"):
        import_peft(target, tmp_path)
    assert_unchanged(target, snap)


def _state(base: nn.Module, r: int = 2) -> dict[str, torch.Tensor]:
    return {
        "base_model.model.fc.lora_A.weight": torch.randn(r, 8),
        "base_model.model.fc.lora_B.weight": torch.randn(6, r),
        "base_model.model.conv.lora_A.weight": torch.randn(r, 4, 3, 3),
        "base_model.model.conv.lora_B.weight": torch.randn(8, r, 1, 1),
    }


def _bad(case: str):
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2}
    s = _state(None)
    if case == "unknown key":
        s["base_model.model.fc.lora_C.weight"] = torch.randn(2, 8)
        return s, cfg, r"fc\.lora_C\.weight: unknown key \(shape \(2, 8\)\)"
    if case == "unknown module":
        s["base_model.model.nope.lora_A.weight"] = torch.randn(2, 8)
        s["base_model.model.nope.lora_B.weight"] = torch.randn(6, 2)
        return s, cfg, r"nope\.lora_A\.weight: the model has no module 'nope'"
    if case == "shape":
        s["base_model.model.conv.lora_A.weight"] = torch.randn(2, 5, 3, 3)
        return s, cfg, r"conv\.lora_A\.weight: expected shape \(2, 4, 3, 3\).*got \(2, 5, 3, 3\)"
    if case == "B shape":
        s["base_model.model.fc.lora_B.weight"] = torch.randn(7, 2)
        return s, cfg, r"fc\.lora_B\.weight: expected shape \(6, 2\).*got \(7, 2\)"
    if case == "rank vs config":
        return s, {**cfg, "rank_pattern": {"fc": 3}}, r"fc\.lora_A\.weight: expected shape \(3, 8\).*got \(2, 8\)"
    if case == "embedding tensor of a non-embedding":
        s["base_model.model.fc2.weight"] = torch.randn(5, 6)
        return s, cfg, r"fc2\.weight: unknown key \(shape \(5, 6\)\)"
    if case == "base_layer shape":
        s["base_model.model.fc.base_layer.weight"] = torch.randn(7, 8)
        return s, cfg, r"fc\.base_layer\.weight: expected shape \(6, 8\) \(the model's fc\.weight.*got \(7, 8\)"
    if case == "missing B":
        del s["base_model.model.fc.lora_B.weight"]
        return s, cfg, r"fc\.lora_B\.weight: missing"
    if case == "dora":
        return s, {**cfg, "use_dora": True}, "DoRA"
    if case == "lora bias":
        s["base_model.model.fc.lora_B.bias"] = torch.randn(6)
        return s, cfg, r"fc\.lora_B\.bias: LoRA biases"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["unknown key", "unknown module", "shape", "B shape", "rank vs config", "embedding tensor of a non-embedding",
             "base_layer shape", "missing B", "dora", "lora bias"],
)
def test_import_errors_name_key_and_shapes_and_leave_model(base, case):
    state, cfg, pattern = _bad(case)
    target = copy.deepcopy(base)
    snap = snapshot(target)
    with pytest.raises(ValueError, match=pattern):
        import_peft(target, state, cfg)
    assert_unchanged(target, snap)


def test_import_refuses_dilated_conv_and_model_with_adapters():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2))
    state = {"0.lora_A.weight": torch.randn(2, 3, 3, 3), "0.lora_B.weight": torch.randn(4, 2, 1, 1)}
    cfg = {"r": 2, "lora_alpha": 2}
    snap = snapshot(net)
    with pytest.raises(ValueError, match="not dilated"):
        import_peft(net, state, cfg)
    assert_unchanged(net, snap)
    lin = fk.inject_flora(nn.Sequential(nn.Linear(3, 4)), fk.FLoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already has FLoRA layers"):
        import_peft(lin, {"0.lora_A.weight": torch.randn(2, 3), "0.lora_B.weight": torch.randn(4, 2)}, cfg)


def test_depthwise_export_and_import_fold_when_rank_exceeds_channels(x, tmp_path):
    """PEFT's grouped rank is groups * r_g; above out_channels the import folds U_out into the core."""
    base = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4)).eval()
    model = fk.inject_flora(copy.deepcopy(base), fk.FLoRAConfig(rank=2, backend="reference"))
    randomize(model)
    cfg = export_peft(model, tmp_path)
    assert cfg["r"] == 8  # 4 groups x rank 2 > 4 channels
    pm = load_peft(base, tmp_path)
    back = import_peft(copy.deepcopy(base), tmp_path, backend="reference")
    assert dict(flora_layers(back))["0"].ranks == (4, 1, 3, 3)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(pm(x), y, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(back(x), y, atol=ATOL, rtol=RTOL)


def test_imported_adapter_saves_and_loads_with_flora_format(base, x, tmp_path):
    pm = peft_model(base, ["conv", "c1", "fc"], r=3, lora_alpha=4, modules_to_save=["head"])
    pm.save_pretrained(str(tmp_path / "peft"))
    model = import_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    fk.save_flora(model, tmp_path / "flora")
    again = fk.load_flora(copy.deepcopy(base), tmp_path / "flora").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), pm(x), atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------- real checkpoints


class Heads(nn.Module):
    """A 3-output head and a 3-channel conv_out (UNet/VAE style): PEFT accepts r = 8 on both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 16, 3, padding=1)
        self.conv_out = nn.Conv2d(16, 3, 3, padding=1)
        self.pw_out = nn.Conv2d(16, 3, 1)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv_in(x))
        return self.conv_out(h).mean((2, 3)) + self.pw_out(h).mean((2, 3)) + self.head(h.mean((2, 3)))


def test_import_rank_above_layer_max_is_exact(tmp_path):
    base = Heads().eval()
    pm = peft_model(base, ["conv_in", "conv_out", "pw_out", "head"], r=8, lora_alpha=16)
    pm.save_pretrained(str(tmp_path))
    model = import_peft(copy.deepcopy(base), tmp_path, backend="reference").eval()
    layers = dict(flora_layers(model))
    assert layers["head"].ranks == (3, 3)  # was: "LoRA rank 8 ... larger than the layer allows"
    assert layers["conv_out"].ranks == (3, 16, 3, 3)
    assert layers["pw_out"].ranks == (3, 3, 1, 1)
    assert layers["conv_in"].ranks == (8, 4, 3, 3)  # fits: unchanged form
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(x), atol=ATOL, rtol=RTOL)
        for name, layer in layers.items():
            peft_layer = pm.base_model.model.get_submodule(name)
            torch.testing.assert_close(layer.delta_weight(), peft_layer.get_delta_weight("default"), atol=1e-5, rtol=1e-5)


transformers = pytest.importorskip("transformers")


def tiny_llama(tied: bool = False) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_import_base_layer_and_saved_embedding_tensors(tmp_path):
    """lm_head targeted: save_embedding_layers=True writes lm_head.base_layer.weight (changed here,
    as after resizing the vocabulary, so loading it matters)."""
    base = tiny_llama()
    pm = peft_model(base, ["q_proj", "v_proj", "lm_head"], r=4, lora_alpha=8)
    with torch.no_grad():
        pm.base_model.model.lm_head.base_layer.weight.add_(torch.randn(40, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path), save_embedding_layers=True)
    keys = set(peft.utils.save_and_load.load_peft_weights(str(tmp_path)))
    assert "base_model.model.lm_head.base_layer.weight" in keys
    model = import_peft(copy.deepcopy(base), tmp_path, backend="reference").eval()
    ids = torch.randint(0, 40, (2, 5))
    torch.testing.assert_close(logits(model, ids), logits(pm, ids), atol=ATOL, rtol=RTOL)
    assert not model.lm_head.base.weight.requires_grad  # base tensors stay frozen


def test_import_modules_to_save_with_embedding_layers_saved(tmp_path):
    """The untargeted input embedding is saved whole (changed here, as after resizing); PEFT then
    also writes <m>.modules_to_save.* and <m>.original_module.* keys for lm_head."""
    base = tiny_llama()
    pm = peft_model(base, ["q_proj"], r=2, lora_alpha=2, modules_to_save=["lm_head"])
    with torch.no_grad():
        pm.base_model.model.model.embed_tokens.weight.add_(torch.randn(40, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path), save_embedding_layers=True)
    keys = set(peft.utils.save_and_load.load_peft_weights(str(tmp_path)))
    assert {"base_model.model.lm_head.original_module.weight", "base_model.model.lm_head.modules_to_save.weight",
            "base_model.model.model.embed_tokens.weight"} <= keys
    model = import_peft(copy.deepcopy(base), tmp_path, backend="reference").eval()
    ids = torch.randint(0, 40, (2, 5))
    torch.testing.assert_close(logits(model, ids), logits(pm, ids), atol=ATOL, rtol=RTOL)
    assert model.lm_head.weight.requires_grad
    assert not model.model.embed_tokens.weight.requires_grad  # base tensors stay frozen


def test_embedding_adapter_import(tmp_path):
    from flora_kernels.convert.peft import embedding_spec
    from flora_kernels.tucker import tucker_reconstruct

    base = tiny_llama()
    pm = peft_model(base, ["q_proj", "embed_tokens"], r=4, lora_alpha=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path))
    state = peft.utils.save_and_load.load_peft_weights(str(tmp_path))
    key = "base_model.model.model.embed_tokens.lora_embedding_"
    emb = base.model.embed_tokens
    spec = embedding_spec("model.embed_tokens", (key + "A", state[key + "A"]), (key + "B", state[key + "B"]),
                          emb, 4, 6 / 4)
    peft_delta = pm.base_model.model.model.embed_tokens.get_delta_weight("default")
    torch.testing.assert_close(tucker_reconstruct(spec.core, spec.factors, spec.scale).float(), peft_delta)
    model = import_peft(copy.deepcopy(base), tmp_path, backend="reference").eval()
    assert type(model.model.embed_tokens).__name__ == "FLoRAEmbedding"
    ids = torch.randint(0, 40, (2, 5))
    torch.testing.assert_close(logits(model, ids), logits(pm, ids), atol=ATOL, rtol=RTOL)


def test_export_gpt2_conv1d_and_embedding_loads_in_peft(tmp_path):
    """transformers Conv1D (fan_in_fan_out) and an nn.Embedding (lora_embedding_A/B, padding
    row kept at zero) export exactly; layer types PEFT cannot express are refused by name."""
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    model = fk.inject_flora(copy.deepcopy(base), fk.FLoRAConfig(rank=3, scale=0.7, target_modules=["c_attn", "c_fc", "wte"]))
    with torch.no_grad():
        for _, layer in flora_layers(model):
            layer.core.normal_(0, 0.5)
    export_peft(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    other = fk.inject_flora(nn.Sequential(nn.ConvTranspose2d(2, 3, 3)), fk.FLoRAConfig(rank=2))
    with pytest.raises(ValueError, match=r"PEFT export: module '0' is a FLoRAConvTranspose2d.*fk.save_flora"):
        export_peft(other, tmp_path / "x")

"""FLoRA inside real model code: a tiny Hugging Face BERT and a ConvNeXt/ResNet-style convnet.

Covers injection targets, "one training step changes only adapter and modules_to_save
parameters", torch.compile(fullgraph=True) equal to eager in outputs and gradients, CPU bf16
autocast, and the model-level ``disable_adapter`` / ``set_adapter_scale``.

torch.compile runs with the ``aot_eager`` compiler: it checks that Dynamo captures each model
whole (fullgraph=True) and that AOTAutograd traces the forward and backward graphs, in a few
seconds. Inductor's C++ codegen costs minutes on a 2-core CPU; set FLORA_TEST_INDUCTOR=1 to run
that variant too.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flora_kernels as fk
from flora_kernels.layers import FLoRALayer, flora_layers

transformers = pytest.importorskip("transformers")

ATOL = RTOL = 1e-5
BERT_TARGETS = ["query", "key", "value", "dense"]


# ----------------------------------------------------------------------------- models


def tiny_bert(layers: int = 2) -> nn.Module:
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv -> LayerNorm (channels last) -> pointwise Linear 4x -> GELU -> Linear, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.pwconv2 = nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce -> 3x3 (strided) -> 1x1 expand, BatchNorm, projection shortcut."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_mid)
        self.conv2 = nn.Conv2d(c_mid, c_mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_mid)
        self.conv3 = nn.Conv2d(c_mid, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.downsample(x))


class ConvNet(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = ConvNeXtBlock(16)
        self.bottleneck = Bottleneck(16, 8, 24)
        self.head = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bottleneck(self.block(self.stem(x))).mean((2, 3)))


def flora_bert(layers: int = 2, strategy: str = "auto", scale: float = 1.0) -> tuple[nn.Module, nn.Module]:
    """(base copy, adapted model) with random non-zero adapters; eval mode."""
    base = tiny_bert(layers).eval()
    model = fk.inject_flora(
        copy.deepcopy(base),
        fk.FLoRAConfig(rank=4, scale=scale, target_modules=BERT_TARGETS, modules_to_save=["classifier"],
                       strategy=strategy, backend="reference"),
    )
    randomize(model)
    return base, model


def flora_convnet(strategy: str = "auto") -> tuple[nn.Module, nn.Module]:
    base = ConvNet().eval()
    model = fk.inject_flora(
        copy.deepcopy(base),
        fk.FLoRAConfig(rank=4, kernel_rank=3, modules_to_save=["head"], strategy=strategy, backend="reference"),
    )
    randomize(model)
    return base, model


@torch.no_grad()
def randomize(model: nn.Module) -> None:
    """Non-zero cores, so every adapter tensor gets a gradient."""
    for _, layer in flora_layers(model):
        layer.core.normal_(0.0, 0.2)


def bert_inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run(model: nn.Module, inputs) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


MODELS = {
    "bert": (flora_bert, bert_inputs),
    "convnet": (flora_convnet, lambda: torch.randn(2, 3, 12, 12)),
}


# ----------------------------------------------------------------------------- injection


def test_bert_targets_and_identity_at_init():
    base = tiny_bert().eval()
    model = fk.inject_flora(copy.deepcopy(base), fk.FLoRAConfig(rank=4, target_modules=BERT_TARGETS))
    names = {n for n, _ in flora_layers(model)}
    expected = {n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in BERT_TARGETS}
    assert names == expected and len(names) == 2 * 6 + 1  # q, k, v, 3 dense per layer + pooler.dense
    inputs = bert_inputs()
    with torch.no_grad():
        torch.testing.assert_close(run(model, inputs), run(base, inputs))  # dW = 0 at init


def test_convnet_targets():
    _, model = flora_convnet()
    layers = dict(flora_layers(model))
    assert "head" not in layers and isinstance(model.head, nn.Linear)
    assert isinstance(layers["block.dwconv"], fk.FLoRAConv2d) and layers["block.dwconv"].ranks == (4, 1, 3, 3)
    assert {"stem", "block.pwconv1", "block.pwconv2", "bottleneck.conv1", "bottleneck.conv2", "bottleneck.conv3",
            "bottleneck.downsample.0"} <= set(layers)


@pytest.mark.parametrize("which", list(MODELS))
def test_one_step_changes_only_adapters_and_modules_to_save(which):
    make, inputs = MODELS[which]
    _, model = make()
    model.train()
    saved = "classifier" if which == "bert" else "head"
    adapter = {n for n, p in model.named_parameters() if ".flora_core." in n or ".flora_u" in n}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter | {f"{saved}.weight", f"{saved}.bias"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = F.cross_entropy(run(model, inputs()), torch.tensor([0, 2]))
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


# ----------------------------------------------------------------------------- torch.compile


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _compile_vs_eager(model: nn.Module, inputs, compiler: str) -> None:
    torch._dynamo.reset()
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    y_eager = run(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dynamo's note on tracing through functools.lru_cache
        y_comp = run(compiled, inputs)
    torch.testing.assert_close(y_comp, y_eager, atol=ATOL, rtol=RTOL)
    y_eager.square().sum().backward()
    y_comp.square().sum().backward()
    ge, gc = _grads(model), _grads(compiled_model)
    assert ge.keys() == gc.keys() and all(g is not None for g in ge.values())
    for n in ge:
        torch.testing.assert_close(gc[n], ge[n], atol=ATOL, rtol=RTOL, msg=n)


@pytest.mark.parametrize(
    "which,strategy",
    [("bert", "auto"), ("convnet", "factorized"), ("convnet", "auto")],
)
def test_compile_fullgraph_matches_eager(which, strategy):
    make, inputs = MODELS[which]
    # One BERT layer keeps Dynamo's tracing short.
    _, model = make(1, strategy=strategy) if which == "bert" else make(strategy=strategy)
    model.train()
    _compile_vs_eager(model, inputs(), "aot_eager")


@pytest.mark.skipif(not os.environ.get("FLORA_TEST_INDUCTOR"), reason="inductor compiles for minutes on CPU; FLORA_TEST_INDUCTOR=1")
def test_compile_inductor_matches_eager():
    _, model = flora_convnet()
    model.train()
    _compile_vs_eager(model, torch.randn(2, 3, 12, 12), "inductor")


# ----------------------------------------------------------------------------- autocast


@pytest.mark.parametrize(
    "which,strategy",
    [
        ("bert", "factorized"),
        ("bert", "merged"),
        ("convnet", "factorized"),
        ("convnet", "merged"),
    ],
)
def test_autocast_bf16_cpu(which, strategy):
    make, inputs = MODELS[which]
    _, model = make(strategy=strategy)
    x = inputs()
    with torch.no_grad():
        ref = run(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(model, x)
    assert y.dtype == torch.bfloat16
    err = (y.float() - ref).norm() / ref.norm()
    assert err < 3e-2, f"bf16 relative error {err:.3g}"
    y.float().square().sum().backward()
    for _, layer in flora_layers(model):
        assert layer.core.grad is not None and layer.core.grad.dtype == torch.float32
        assert torch.isfinite(layer.core.grad).all()


# ----------------------------------------------------------------------------- disable_adapter / scale


def test_disable_adapter_runs_base_model():
    base, model = flora_bert()
    x = bert_inputs()
    with torch.no_grad():
        y_base, y = run(base, x), run(model, x)
        assert (y - y_base).abs().max() > 1e-3
        with fk.disable_adapter(model):
            torch.testing.assert_close(run(model, x), y_base)
        torch.testing.assert_close(run(model, x), y)
        fk.merge_flora(model)
        with fk.disable_adapter(model):  # merged adapters are unmerged (and stay so, as in PEFT)
            assert not any(layer.merged for _, layer in flora_layers(model))
            torch.testing.assert_close(run(model, x), y_base, atol=ATOL, rtol=RTOL)
        assert not any(layer.merged for _, layer in flora_layers(model))
        torch.testing.assert_close(run(model, x), y, atol=ATOL, rtol=RTOL)


def test_disable_adapter_restores_state_on_error():
    _, model = flora_bert()
    w = {n: layer.base.weight.clone() for n, layer in flora_layers(model)}
    fk.merge_flora(model)
    with pytest.raises(RuntimeError, match="boom"), fk.disable_adapter(model):
        raise RuntimeError("boom")
    for n, layer in flora_layers(model):  # enabled again; unmerged by disabling, as in PEFT
        assert not layer.merged and layer.adapter_enabled
        torch.testing.assert_close(layer.base.weight, w[n], atol=1e-6, rtol=1e-6)


def test_disable_adapter_for_preference_tuning():
    """DPO-style: the reference log-probs come from the same model with adapters disabled, and
    carry no gradient; the policy's do."""
    base, model = flora_bert()
    model.train()
    x = bert_inputs()
    with torch.no_grad(), fk.disable_adapter(model):
        ref_logp = run(model, x).log_softmax(-1)
    torch.testing.assert_close(ref_logp, run(base.train(), x).log_softmax(-1).detach())
    logp = run(model, x).log_softmax(-1)
    loss = -F.logsigmoid(0.1 * ((logp - ref_logp)[:, 0] - (logp - ref_logp)[:, 1])).mean()
    loss.backward()
    assert all(layer.core.grad is not None for _, layer in flora_layers(model))


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_set_adapter_scale(merged):
    base, model = flora_bert()
    x = bert_inputs()
    doubled = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in flora_layers(doubled):
            layer.core.mul_(2.0)  # dW is linear in the core: scale 2 == core * 2
        want2, y_base = run(doubled, x), run(base, x)
        if merged:
            fk.merge_flora(model)
        fk.set_adapter_scale(model, 2.0)
        assert all(layer.scale == 2.0 and layer.merged == merged for _, layer in flora_layers(model))
        torch.testing.assert_close(run(model, x), want2, atol=ATOL, rtol=RTOL)
        fk.set_adapter_scale(model, 0.0)
        torch.testing.assert_close(run(model, x), y_base, atol=ATOL, rtol=RTOL)
    with pytest.raises(TypeError):
        fk.set_adapter_scale(model, "2")
    assert all(isinstance(layer, FLoRALayer) for _, layer in flora_layers(model))


# ----------------------------------------------------------------------------- strategy fallback


def test_model_wide_strategy_falls_back_for_layer_types_without_it():
    """strategy="factorized" on a model with MultiheadAttention (merged path only): one warning
    naming the attention layers, which use "auto"; the other layers keep "factorized". A layer
    built directly with the strategy it lacks still raises."""
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fk.inject_flora(enc, fk.FLoRAConfig(rank=2, strategy="factorized"))
    notes = [str(w.message) for w in caught if "strategy" in str(w.message)]
    assert len(notes) == 1
    assert "layers.0.self_attn (FLoRAMultiheadAttention: 'factorized' asked, it has merged)" in notes[0]
    assert "layers.1.self_attn" in notes[0] and "linear1" not in notes[0]
    layers = dict(flora_layers(enc))
    assert layers["layers.0.self_attn"].strategy == "auto"
    assert layers["layers.0.linear1"].strategy == "factorized"
    assert layers["layers.0.self_attn.base_layer.out_proj"].strategy == "factorized"
    enc(torch.randn(2, 5, 16)).sum().backward()
    with pytest.raises(ValueError, match=r"strategy: expected one of \('auto', 'merged'\) for FLoRAMultiheadAttention"):
        fk.FLoRAMultiheadAttention(nn.MultiheadAttention(16, 2), rank=2, strategy="factorized")

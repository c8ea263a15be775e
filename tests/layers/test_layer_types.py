"""Layer types beyond Linear/ConvNd: Linear subclasses, transformers Conv1D, Embedding,
ConvTranspose1d/2d/3d, MultiheadAttention; attribute read-through; weight norm (legacy and
parametrized) and tied weights under merge; training while merged."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import flora_kernels as fk
from flora_kernels.backends import BackendUnavailable
from flora_kernels.layers import FLoRALayer, flora_layers, layer_class_for, wrap
from flora_kernels.tucker import tucker_reconstruct

ATOL = RTOL = 1e-5


def randomize_(layer: FLoRALayer, std: float = 0.5) -> None:
    with torch.no_grad():
        for a in layer.adapter_names:
            core, factors = layer.tensors(a)
            core.normal_(0, std)
            for f in factors:
                f.normal_(0, 0.5)


def explicit(layer: FLoRALayer, x, *args, **kwargs):
    """The oracle: the base module's own forward with W + s dW put in (stored layout)."""
    d = layer._modes_to_stored(sum(tucker_reconstruct(*layer.tensors(a), layer.flora_settings[a].scale)
                                   for a in layer.active_adapters))
    w = layer.base_weight()
    return functional_call(layer.base_layer, {layer.weight_name: w + d.to(w.dtype)}, (x, *args), kwargs)


class TimmLikeLinear(nn.Linear):
    """A subclass with its own forward (as timm's Linear has)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


CASES = {
    "linear-subclass": (lambda: TimmLikeLinear(7, 5), (3, 7)),
    "nondyn-quant-linear": (lambda: nn.modules.linear.NonDynamicallyQuantizableLinear(6, 9), (2, 4, 6)),
    "convT1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1), (2, 4, 7)),
    "convT2d-groups": (lambda: nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 1), groups=2, dilation=(1, 2)), (2, 4, 5, 6)),
    "convT3d": (lambda: nn.ConvTranspose3d(3, 4, 2, stride=2, bias=False), (1, 3, 3, 4, 2)),
    "conv-subclass": (lambda: type("MyConv", (nn.Conv2d,), {})(3, 5, 3, padding=1), (2, 3, 6, 5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_explicit_weight(case):
    make, xshape = CASES[case]
    base = make()
    layer = wrap(base, rank=2, kernel_rank=2, scale=0.7)
    randomize_(layer)
    x = torch.randn(xshape, requires_grad=True)
    y = layer(x)
    xr = x.detach().clone().requires_grad_(True)
    want = explicit(layer, xr)
    torch.testing.assert_close(y, want, atol=ATOL, rtol=RTOL)
    dy = torch.randn_like(y)
    core, factors = layer.tensors("default")
    got = torch.autograd.grad(y, [x, core, *factors], dy)
    exp = torch.autograd.grad(want, [xr, core, *factors], dy)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    # merge / unmerge round trip
    w0 = layer.base_weight().detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.base_layer(x), y, atol=ATOL, rtol=RTOL)
    layer.unmerge()
    torch.testing.assert_close(layer.base_weight(), w0, atol=1e-6, rtol=1e-6)


def test_conv_transpose_output_size_and_gradcheck():
    base = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1).double()
    layer = wrap(base, rank=2, kernel_rank=2, scale=0.5, strategy="factorized")
    randomize_(layer)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = layer(x, output_size=(8, 8))
    assert y.shape == (1, 4, 8, 8)
    torch.testing.assert_close(y, explicit(layer, x, output_size=(8, 8)))
    core, factors = layer.tensors("default")
    names = ["flora_core.default"] + [f"flora_u{i}.default" for i in range(len(factors))]
    ps = [p.detach().clone().requires_grad_(True) for p in [core, *factors]]
    assert torch.autograd.gradcheck(lambda x, *p: functional_call(layer, dict(zip(names, p)), (x,)), (x, *ps), fast_mode=True)


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("convT")])
@pytest.mark.parametrize("strategy", ["factorized", "merged"])
def test_conv_transpose_strategies_agree(case, strategy):
    make, xshape = CASES[case]
    layer = wrap(make(), rank=2, kernel_rank=2, scale=0.7, strategy=strategy)
    randomize_(layer)
    x = torch.randn(xshape, requires_grad=True)
    y = layer(x)
    xr = x.detach().clone().requires_grad_(True)
    want = explicit(layer, xr)
    torch.testing.assert_close(y, want, atol=ATOL, rtol=RTOL)
    core, factors = layer.tensors("default")
    dy = torch.randn_like(y)
    for g, e in zip(torch.autograd.grad(y, [x, core, *factors], dy), torch.autograd.grad(want, [xr, core, *factors], dy)):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_conv_transpose_backends():
    with pytest.raises(BackendUnavailable, match="reference"):
        wrap(nn.ConvTranspose1d(3, 4, 3), backend="triton")


# --- Conv1D (transformers) --------------------------------------------------------------------


def test_hf_conv1d_as_linear():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    base = Conv1D(5, 7)  # nf=5 outputs, nx=7 inputs: weight (7, 5)
    layer = wrap(base, rank=3, scale=0.9)
    assert type(layer).__name__ == "FLoRALinear"
    assert tuple(layer.weight_modes().shape) == (5, 7) and layer.nf == 5
    randomize_(layer)
    x = torch.randn(2, 3, 7)
    dw = tucker_reconstruct(layer.core, layer.factors, 0.9)
    torch.testing.assert_close(layer(x), x @ (base.weight + dw.t()) + base.bias, atol=ATOL, rtol=RTOL)
    for strategy in ("factorized", "merged"):
        layer.flora_settings["default"] = layer.flora_settings["default"].__class__(
            **{**layer.flora_settings["default"].__dict__, "strategy": strategy}
        )
        torch.testing.assert_close(layer(x), x @ (base.weight + dw.t()) + base.bias, atol=ATOL, rtol=RTOL)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(base(x), y, atol=ATOL, rtol=RTOL)
    layer.unmerge()


# --- Embedding --------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["factorized", "merged", "auto"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding(strategy, padding_idx):
    base = nn.Embedding(11, 6, padding_idx=padding_idx)
    layer = wrap(base, rank=(3, 4), scale=0.6, strategy=strategy)
    randomize_(layer)
    ids = torch.tensor([[0, 2, 5, 10], [2, 2, 7, 1]])
    y = layer(ids)
    dw = tucker_reconstruct(layer.core, layer.factors, 0.6)
    if padding_idx is not None:
        dw = dw.clone()
        dw[padding_idx] = 0
        assert torch.equal(y[ids == padding_idx], base(ids)[ids == padding_idx])
    torch.testing.assert_close(y, F.embedding(ids, base.weight + dw), atol=ATOL, rtol=RTOL)
    core, factors = layer.tensors("default")
    g = torch.autograd.grad(y.square().sum(), [core, *factors])
    ref = torch.autograd.grad(F.embedding(ids, base.weight + _masked(core, factors, padding_idx)).square().sum(), [core, *factors])
    for a, b in zip(g, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    layer.merge()
    torch.testing.assert_close(base(ids), y, atol=ATOL, rtol=RTOL)
    layer.unmerge()


def _masked(core, factors, pad):
    dw = tucker_reconstruct(core, factors, 0.6)
    return dw if pad is None else dw.index_fill(0, torch.tensor([pad]), 0.0)


def test_embedding_factorized_never_builds_dw(monkeypatch):
    layer = wrap(nn.Embedding(50, 8), rank=2, strategy="factorized")
    randomize_(layer)
    import flora_kernels.layers.base as lb

    monkeypatch.setattr(lb, "tucker_reconstruct", lambda *a, **k: pytest.fail("dW built"))
    layer(torch.tensor([1, 2, 3]))


def test_embedding_max_norm_refuses_merge():
    layer = wrap(nn.Embedding(10, 4, max_norm=1.0), rank=2)
    with pytest.raises(ValueError, match="max_norm"):
        layer.merge()


# --- MultiheadAttention -----------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_in_and_out_proj(batch_first):
    torch.manual_seed(1)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first))
    ref = copy.deepcopy(model)
    fk.inject_flora(model, fk.FLoRAConfig(rank=2, target_modules=["self_attn", "out_proj"]))
    attn = model[0].self_attn
    assert type(attn).__name__ == "FLoRAMultiheadAttention"
    out = attn.base_layer.out_proj
    assert type(out).__name__ == "FLoRALinear"
    assert attn.batch_first == batch_first and attn.embed_dim == 8
    for _, layer in flora_layers(model):
        randomize_(layer, 0.3)
    x = torch.randn(3, 4, 8)
    y = model(x)
    # oracle: the plain model with W + dW written into in_proj_weight and out_proj.weight
    with torch.no_grad():
        ref[0].self_attn.in_proj_weight += attn.delta_weight()
        ref[0].self_attn.out_proj.weight += out.delta_weight()
    torch.testing.assert_close(y, ref(x), atol=ATOL, rtol=RTOL)
    y.sum().backward()
    assert attn.core.grad is not None and out.core.grad is not None
    fk.merge_flora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, atol=ATOL, rtol=RTOL)
    fk.unmerge_flora(model)
    plain = fk.merge_and_unload(model)
    assert type(plain[0].self_attn) is nn.MultiheadAttention
    torch.testing.assert_close(plain(x), y, atol=ATOL, rtol=RTOL)


def test_out_proj_alone_wraps_its_attention():
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
    fk.inject_flora(model, fk.FLoRAConfig(rank=2, target_modules=["out_proj"]))
    attn = model[0].self_attn
    assert isinstance(attn, FLoRALayer) and attn.adapter_names == []
    out = attn.base_layer.out_proj
    randomize_(out)
    x = torch.randn(2, 3, 8)
    y = model(x)
    with fk.disable_adapter(model):
        y0 = model(x)
    assert (y - y0).abs().max() > 1e-3  # the out_proj adapter is used, not silently bypassed


def test_mha_separate_qkv_refused():
    with pytest.raises(TypeError, match="kdim"):
        wrap(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))


# --- attribute read-through -------------------------------------------------------------------


def test_read_through_attributes():
    conv = nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
    layer = wrap(conv, rank=2)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(layer, attr) is getattr(conv, attr)
    assert layer.weight is conv.weight and layer.bias is conv.bias
    lin = wrap(nn.Linear(3, 4), rank=2)
    assert lin.in_features == 3 and lin.out_features == 4
    ct = wrap(nn.ConvTranspose2d(2, 3, 3, output_padding=0), rank=2)
    assert ct.output_padding == (0, 0)
    with pytest.raises(AttributeError):
        lin.no_such_attribute


def test_registry():
    assert layer_class_for(nn.LSTM(2, 3)) is None
    assert layer_class_for(TimmLikeLinear(2, 3)).__name__ == "FLoRALinear"
    with pytest.raises(TypeError, match="unsupported module type LSTM"):
        wrap(nn.LSTM(2, 3))


# --- weight norm ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["legacy", "parametrized"])
def test_weight_norm_merge_is_exact(kind):
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, 3, padding=1)
    if kind == "legacy":
        conv = torch.nn.utils.weight_norm(conv)
    else:
        conv = torch.nn.utils.parametrizations.weight_norm(conv)
    model = nn.Sequential(conv)
    sources = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fk.inject_flora(model, fk.FLoRAConfig(rank=2))
    randomize_(model[0])
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        base_y = model[0].base_layer(x)
    y = model(x)
    assert (y - base_y).abs().max() > 1e-2  # the adapter acts on the weight-normed weight
    w_eff = model[0].base_weight() + model[0].delta_weight()
    torch.testing.assert_close(y, F.conv1d(x, w_eff, model[0].bias, padding=1), atol=ATOL, rtol=RTOL)
    # trains: gradients reach the adapter, not the frozen g/v
    y.sum().backward()
    assert model[0].core.grad is not None
    assert all(p.grad is None for p in model[0].base_layer.parameters())
    fk.merge_flora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, atol=ATOL, rtol=RTOL)
    fk.unmerge_flora(model)
    for k, v in model[0].base_layer.state_dict().items():
        assert torch.equal(v, sources[f"0.{k}"]), k
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, atol=ATOL, rtol=RTOL)
    plain = fk.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), y, atol=ATOL, rtol=RTOL)


# --- tied weights -----------------------------------------------------------------------------


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.emb(ids))))


def test_default_targets_leave_tied_head_alone():
    model = TiedLM()
    fk.inject_flora(model, fk.FLoRAConfig(rank=2))
    assert [n for n, _ in flora_layers(model)] == ["body"]
    model = TiedLM()
    fk.inject_flora(model, fk.FLoRAConfig(rank=2, target_modules="all-linear"))
    assert [n for n, _ in flora_layers(model)] == ["body"]


def test_tied_head_merge_keeps_embedding():
    model = TiedLM()
    emb0 = model.emb.weight.detach().clone()
    fk.inject_flora(model, fk.FLoRAConfig(rank=2, target_modules=["head"]))
    randomize_(model.head)
    ids = torch.tensor([[1, 2, 3], [4, 5, 19]])
    y = model(ids)
    fk.merge_flora(model)
    assert torch.equal(model.emb.weight, emb0)  # the embedding is not corrupted
    with torch.no_grad():
        torch.testing.assert_close(model(ids), y, atol=ATOL, rtol=RTOL)
    fk.unmerge_flora(model)
    assert model.head.base_layer.weight is model.emb.weight  # the tie is restored
    with pytest.warns(UserWarning, match="no longer shares"):
        plain = fk.merge_and_unload(model)
    torch.testing.assert_close(plain(ids), y, atol=ATOL, rtol=RTOL)
    assert torch.equal(plain.emb.weight, emb0)


def test_training_while_merged_says_unmerge():
    model = nn.Sequential(nn.Linear(4, 3))
    fk.inject_flora(model, fk.FLoRAConfig(rank=2))
    fk.merge_flora(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        model(torch.randn(2, 4)).sum().backward()
    with torch.no_grad():
        model(torch.randn(2, 4))  # inference while merged is fine


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_encoder_fast_path_does_not_bypass_adapters(activation):
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, activation=activation)
    flag = model.activation_relu_or_gelu
    fk.inject_flora(model, fk.FLoRAConfig(rank=2, target_modules=["linear1"]))
    randomize_(model.linear1)
    x = torch.randn(2, 3, 8)
    y = model(x)  # training mode: the slow path
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), y, atol=ATOL, rtol=RTOL)  # eval: would be the native fast path
    plain = fk.merge_and_unload(model)
    assert plain.activation_relu_or_gelu == flag  # restored once no FLoRA layer is left
    with torch.no_grad():
        torch.testing.assert_close(plain(x), y, atol=ATOL, rtol=RTOL)

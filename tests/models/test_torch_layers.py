"""Plain torch.nn models built around the layer types FLoRA adapts beyond Linear and ConvNd.

nn.TransformerEncoderLayer (nn.MultiheadAttention with a packed in-projection and a
NonDynamicallyQuantizableLinear out_proj; in eval mode under no_grad torch takes a fused fast
path that reads the attention's weights directly), a torchvision-free ViT-like model
(nn.MultiheadAttention, batch_first=False), nn.Embedding with padding_idx, nn.ConvTranspose1d/2d/3d
with stride, padding, output_padding, groups and dilation (and output_size passed to the
forward), the legacy torch.nn.utils.weight_norm on Conv1d, and
torch.nn.utils.parametrizations.weight_norm on Conv1d and Linear.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from common import RANK, Case, build, parametrize_cases, run_check
from torch import Tensor, nn

import flora_kernels as fk
from flora_kernels.layers import flora_layers


class TransformerEncoder(nn.Module):
    """Token features (N, L, 16) -> one nn.TransformerEncoderLayer (batch_first) -> (N, L, 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class ViTLike(nn.Module):
    """Images (N, 3, 16, 16) -> 4x4 patches -> [cls] + pos -> pre-norm MHA + MLP block -> head (N, 3)."""

    def __init__(self, dim: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2)  # batch_first=False: (L, N, E)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        h = self.norm1(t).transpose(0, 1)
        t = t + self.attn(h, h, h, need_weights=False)[0].transpose(0, 1)
        t = t + self.mlp(self.norm2(t))
        return self.head(t[:, 0])


class EmbeddingBagOfWords(nn.Module):
    """Token ids (N, L) -> nn.Embedding(50, 16, padding_idx=0) -> mean over L -> Linear (N, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16, padding_idx=0)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(ids)).mean(1))


class Upsampler2d(nn.Module):
    """(N, 4, 5, 6) -> ConvTranspose2d(stride 2, output_padding 1, groups 2) -> ConvTranspose2d(dilation 2,
    called with output_size) -> (N, 3, 22, 26)."""

    def __init__(self) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.up2 = nn.ConvTranspose2d(6, 3, (3, 2), stride=2, padding=(1, 0), dilation=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.up2(torch.tanh(self.up1(x)), output_size=(22, 26))


def conv_transpose_1d() -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), nn.Tanh(),
        nn.ConvTranspose1d(6, 4, 4, stride=3, dilation=2, output_padding=2),
    )


def conv_transpose_3d() -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose3d(4, 2, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), output_padding=(0, 1, 1)), nn.Tanh(),
        nn.ConvTranspose3d(2, 4, 3, groups=2, dilation=(1, 1, 2)),
    )


def legacy_weight_norm() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        return nn.Sequential(
            nn.utils.weight_norm(nn.Conv1d(4, 6, 3, padding=1)), nn.GELU(), nn.utils.weight_norm(nn.Conv1d(6, 3, 1)),
        )


def parametrized_weight_norm() -> nn.Module:
    wn = nn.utils.parametrizations.weight_norm
    return nn.Sequential(
        wn(nn.Conv1d(4, 6, 3, padding=2, groups=2, dilation=2)), nn.GELU(), nn.Flatten(1), wn(nn.Linear(42, 3)),
    )


CASES = [
    Case(
        "transformer_encoder_layer", TransformerEncoder, lambda: ((torch.randn(2, 5, 16),), {}),
        adapted={"layer.self_attn": "FLoRAMultiheadAttention", "layer.linear1": "FLoRALinear",
                 "layer.linear2": "FLoRALinear"},
    ),
    Case(
        "vit_like", ViTLike, lambda: ((torch.randn(2, 3, 16, 16),), {}),
        config={"modules_to_save": ["head"]},
        adapted={"patch": "FLoRAConv2d", "attn": "FLoRAMultiheadAttention", "mlp.0": "FLoRALinear"},
        untouched=("head",),
    ),
    Case(
        "embedding", EmbeddingBagOfWords, lambda: ((torch.cat([torch.randint(1, 50, (2, 6)), torch.zeros(2, 1, dtype=torch.long)], 1),), {}),
        config={"target_modules": ["emb", "head"]},
        adapted={"emb": "FLoRAEmbedding", "head": "FLoRALinear"},
    ),
    Case(
        "conv_transpose1d", conv_transpose_1d, lambda: ((torch.randn(2, 4, 7),), {}),
        adapted={"0": "FLoRAConvTranspose1d", "2": "FLoRAConvTranspose1d"},
    ),
    Case(
        "conv_transpose2d", Upsampler2d, lambda: ((torch.randn(2, 4, 5, 6),), {}),
        adapted={"up1": "FLoRAConvTranspose2d", "up2": "FLoRAConvTranspose2d"},
    ),
    Case(
        "conv_transpose3d", conv_transpose_3d, lambda: ((torch.randn(2, 4, 3, 4, 5),), {}),
        adapted={"0": "FLoRAConvTranspose3d", "2": "FLoRAConvTranspose3d"},
    ),
    Case(
        "legacy_weight_norm", legacy_weight_norm, lambda: ((torch.randn(2, 4, 7),), {}),
        adapted={"0": "FLoRAConv1d", "2": "FLoRAConv1d"},
    ),
    Case(
        "parametrized_weight_norm", parametrized_weight_norm, lambda: ((torch.randn(2, 4, 7),), {}),
        adapted={"0": "FLoRAConv1d", "3": "FLoRALinear"},
    ),
]


@pytest.mark.parametrize("case, check", parametrize_cases(CASES))
def test_model(case: Case, check: str, tmp_path: Path) -> None:
    run_check(case, check, tmp_path)


# ----------------------------------------------------------------------------- layer-specific


def test_transformer_encoder_fast_path_keeps_adapter() -> None:
    """In eval mode, when no input or weight of nn.TransformerEncoderLayer requires grad (the base
    weights are frozen), torch runs a fused kernel that reads ``self_attn.in_proj_weight`` etc.
    directly. The adapted layer must still apply the adapter there: eval == train (dropout is 0)."""
    case = CASES[0]
    model = build(case)
    fk.inject_flora(model, case.cfg())
    for _, layer in flora_layers(model):
        torch.nn.init.normal_(layer.core, std=0.05)
    x = case.inputs()[0][0]
    with torch.no_grad():
        with fk.disable_adapter(model):
            base = model.train()(x)
        slow = model.train()(x)
        fast = model.eval()(x)
    assert (slow - base).abs().max().item() > 1e-4, "the adapters do not change the train-mode output"
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5, msg="eval (fast path) drops the adapters")


def test_conv_transpose_reads_output_padding() -> None:
    model = build(CASES[4])
    fk.inject_flora(model, CASES[4].cfg())
    up1 = model.up1
    assert isinstance(up1, fk.FLoRALayer)
    assert (up1.stride, up1.padding, up1.output_padding, up1.groups, up1.dilation) == ((2, 2), (1, 1), (1, 1), 2, (1, 1))
    assert up1.in_channels == 4 and up1.out_channels == 6 and up1.transposed


def test_embedding_padding_row_gets_no_gradient() -> None:
    """nn.Embedding(padding_idx=0) never updates the padding row; the adapter's row gather must not either."""
    case = CASES[2]
    model = build(case)
    fk.inject_flora(model, case.cfg())
    layer = dict(flora_layers(model))["emb"]
    torch.nn.init.normal_(layer.core, std=0.1)
    model(*case.inputs()[0]).square().sum().backward()
    assert layer.factors[0].grad[0].abs().max().item() == 0.0, "padding row of U_0 got a gradient"
    assert layer.factors[0].grad[1:].abs().sum().item() > 0


def test_multihead_attention_ranks_cover_packed_projection() -> None:
    model = build(CASES[1])
    fk.inject_flora(model, fk.FLoRAConfig(rank=RANK, target_modules=["attn"]))
    layer = model.attn
    assert isinstance(layer, fk.FLoRALayer)
    assert layer.base_layer.in_proj_weight.shape == (48, 16)
    assert layer.embed_dim == 16 and layer.num_heads == 2 and layer.batch_first is False

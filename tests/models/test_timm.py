"""timm (and torchvision) image models from their configs, random weights, at 32x32 input.

ConvNeXt-atto (depthwise 7x7 convs, 1x1-conv MLP; one block per stage), ResNet-18 (strided 3x3
convs, projection shortcuts, a modules_to_save head; one block per stage), EfficientNet (timm's
test_efficientnet: the B0 block types (depthwise convs, squeeze-excite 1x1 convs), one block per
stage; a regex picks two blocks; MobileNetV3 is built from the same timm block classes and is
left out to keep the suite short), ViT-tiny ("all-linear": fused qkv), torchvision's
VisionTransformer (nn.MultiheadAttention with its packed in-projection). Widths and depths are
shrunk through the models' own constructor arguments: every FLoRA layer costs time under
torch.compile.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from common import Case, parametrize_cases, run_check

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def image(c: int = 3, s: int = 32):
    return lambda: ((torch.randn(2, c, s, s),), {})


def tv_vit():
    return torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3
    )


CASES = [
    Case(
        "convnext_atto",
        lambda: timm.create_model("convnext_atto", num_classes=5, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)),
        image(),
        adapted={"stem.0": "FLoRAConv2d", "stages.0.blocks.0.conv_dw": "FLoRAConv2d", "head.fc": "FLoRALinear"},
    ),
    Case(
        "resnet18",
        lambda: timm.create_model(
            "resnet18", num_classes=5, layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8,
            zero_init_last=False,  # a zero-initialized last BN would cut every residual branch's gradient
        ),
        image(),
        config={"modules_to_save": ["fc"]},
        adapted={"conv1": "FLoRAConv2d", "layer2.0.downsample.0": "FLoRAConv2d"},
        untouched=("fc",),
    ),
    Case(
        "efficientnet",
        lambda: timm.create_model("test_efficientnet", num_classes=5),
        image(),
        config={"target_modules": r"conv_stem|blocks\.[13]\.0\.(conv_\w+|se\.conv_\w+)|conv_head|classifier"},
        adapted={"blocks.3.0.conv_dw": "FLoRAConv2d", "blocks.3.0.se.conv_reduce": "FLoRAConv2d",
                 "classifier": "FLoRALinear"},
    ),
    Case(
        "vit_tiny_patch16_224",
        lambda: timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, depth=1),
        image(),
        config={"target_modules": "all-linear"},
        adapted={"blocks.0.attn.qkv": "FLoRALinear", "blocks.0.mlp.fc2": "FLoRALinear"},
        untouched=("patch_embed.proj",),
    ),
    Case(
        "torchvision_vit",
        tv_vit,
        image(s=16),
        adapted={"encoder.layers.encoder_layer_0.self_attention": "FLoRAMultiheadAttention",
                 "conv_proj": "FLoRAConv2d", "heads.head": "FLoRALinear"},
    ),
]


@pytest.mark.parametrize("case, check", parametrize_cases(CASES))
def test_model(case: Case, check: str, tmp_path: Path) -> None:
    run_check(case, check, tmp_path)

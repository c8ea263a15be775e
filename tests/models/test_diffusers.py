"""diffusers models from their configs, random weights, 8x8 (UNets) and 16x16 (VAE) samples, two
resolution levels.

UNet2DModel (resnets with time-embedding projections, self-attention, down/up-sampling convs; no
mid-block attention), UNet2DConditionModel (cross-attention to encoder states: to_k/to_v read the
16-wide context; no mid block),
AutoencoderKL (encoder, quant convs, decoder; the deterministic posterior mode). Each adapts a
list of module-name suffixes that covers every kind of layer in it, not every layer: every FLoRA
layer costs time under torch.compile.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from common import Case, parametrize_cases, run_check

diffusers = pytest.importorskip("diffusers")


def unet2d():
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), add_attention=False,  # no mid-block attention
    )


def unet2d_condition():
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type=None,
    )


def autoencoder_kl():
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )


CASES = [
    Case(
        "unet2d", unet2d, lambda: ((torch.randn(2, 3, 8, 8), torch.tensor([3, 7])), {}),
        config={"target_modules": ["conv_in", "conv_out", "to_q", "to_v", "time_embedding.linear_1", "mid_block.resnets.0.time_emb_proj",
                                   "down_blocks.0.resnets.0.conv1", "downsamplers.0.conv", "upsamplers.0.conv"]},
        adapted={"conv_in": "FLoRAConv2d", "down_blocks.1.attentions.0.to_q": "FLoRALinear",
                 "down_blocks.0.downsamplers.0.conv": "FLoRAConv2d", "up_blocks.0.upsamplers.0.conv": "FLoRAConv2d",
                 "mid_block.resnets.0.time_emb_proj": "FLoRALinear"},
        untouched=("down_blocks.1.attentions.0.to_k",),
    ),
    Case(
        "unet2d_condition", unet2d_condition,
        lambda: ((torch.randn(2, 4, 8, 8), torch.tensor([3, 7])), {"encoder_hidden_states": torch.randn(2, 5, 16)}),
        config={"target_modules": ["conv_in", "conv_out", "attn2.to_k", "attn2.to_v", "down_blocks.0.attentions.0.proj_in",
                                   "conv_shortcut"]},
        adapted={"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": "FLoRALinear",
                 "down_blocks.0.attentions.0.proj_in": "FLoRAConv2d", "conv_out": "FLoRAConv2d"},
        untouched=("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",),
    ),
    Case(
        "autoencoder_kl", autoencoder_kl, lambda: ((torch.randn(2, 3, 16, 16),), {}),
        config={"target_modules": ["conv_in", "conv_out", "quant_conv", "post_quant_conv", "to_q", "to_v",
                                   "conv_shortcut"]},
        adapted={"encoder.conv_in": "FLoRAConv2d", "decoder.conv_out": "FLoRAConv2d", "quant_conv": "FLoRAConv2d",
                 "encoder.mid_block.attentions.0.to_q": "FLoRALinear"},
    ),
]


@pytest.mark.parametrize("case, check", parametrize_cases(CASES))
def test_model(case: Case, check: str, tmp_path: Path) -> None:
    run_check(case, check, tmp_path)

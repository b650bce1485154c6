"""Architectures of the toy world's models (Stable-Diffusion-format and FLUX-format) and of its classifier.

The sizes follow the feasibility measurements in ``shared/TOYWORLD-NOTES.md``: a
16x16x4 latent space from a small ``AutoencoderKL``, a 2-layer ``CLIPTextModel``, and a
1.7M-parameter ``UNet2DConditionModel`` with cross-attention at 8x8 and 4x4.

The noise schedule uses *linear* betas (DDPM's), not SD's ``scaled_linear``: with
``scaled_linear`` the terminal signal level sqrt(alpha_bar_T) is 0.068, enough for the mean
colour of a 16x16 latent to leak through the noise so that the model learns to read colour
from the starting noise (which at sampling time carries none); with linear betas it is
0.006. Sampling uses trailing timestep spacing so the first step is t = 999.

The FLUX-format model (:func:`make_flux_transformer`) is a ``FluxTransformer2DModel`` over the same
VAE's latents packed 2x2 (16x16x4 -> 64 tokens of 16), 2 double-stream and 4 single-stream blocks of
4 heads of 32 (2.3M parameters), with a 2-layer T5 encoder (:func:`make_t5_encoder`) for the token
stream and the SD model's CLIP text encoder for the pooled vector. It is not guidance-distilled
(``guidance_embeds=False``, as FLUX.1-schnell's architecture): it samples with true classifier-free
guidance (``FluxPipeline(true_cfg_scale=..., negative_prompt="")``).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL, DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel,
    UNet2DConditionModel,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from erasure.toyworld.world import ATTRIBUTES

MAX_TOKENS = 32
TEXT_WIDTH = 128

SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    prediction_type="epsilon", clip_sample=False,
)


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=32, mid_block_add_attention=False,
    )


def make_text_encoder(vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_WIDTH, hidden_act="quick_gelu",
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    return CLIPTextModel(config)


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8,
    )


def make_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE)


def make_sample_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULE, timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=1)


def make_flux_transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=False, axes_dims_rope=(8, 12, 12),
    )


def make_t5_encoder(vocab_size: int, pad_token_id: int, eos_token_id: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size, d_model=TEXT_WIDTH, d_kv=32, d_ff=2 * TEXT_WIDTH, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
        decoder_start_token_id=pad_token_id,
    )
    return T5EncoderModel(config)


def make_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX's Euler sampler without resolution-dependent shifting (shift 1: 64 tokens are far below
    FLUX's base sequence length of 256)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


class ToyClassifier(nn.Module):
    """A small CNN reading shape, colour and style from a 32x32 image in [-1, 1].

    ``forward`` returns one logit tensor per attribute, keyed by attribute name.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(3, width), nn.MaxPool2d(2),  # 16x16
            block(width, 2 * width), nn.MaxPool2d(2),  # 8x8
            block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(4 * width, len(values)) for name, values in ATTRIBUTES.items()})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features, used as the feature space of KID."""
        return self.features(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.embed(images)
        return {name: head(features) for name, head in self.heads.items()}

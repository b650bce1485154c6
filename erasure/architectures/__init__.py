"""Real Stable Diffusion architectures (SD 1.4/1.5, SD 2.1) built from their configs with random weights.

No weights can be downloaded here, so the code paths of real checkpoints (layer names,
dimensions, 77-token context, prediction type) are tested on these: same modules, random
values. The tokenizer is the toy world's, padded to 77 tokens (its ids lie inside CLIP's vocabulary).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from erasure.toyworld.tokenizer import build_tokenizer

ARCHITECTURES = {p.stem: p for p in Path(__file__).parent.glob("*.json")}


def architecture_config(name: str) -> dict:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return json.loads(ARCHITECTURES[name].read_text())


def tiny(config: dict) -> dict:
    """The same architecture at small widths and depths: the same classes, block types, context
    width (so presets detect it), token context and prediction type; for fast end-to-end tests."""
    blocks = len(config["unet"]["block_out_channels"])
    return {
        **config,
        "unet": {**config["unet"], "block_out_channels": [32] * (blocks - 2) + [64, 64], "layers_per_block": 1},
        "text_encoder": {**config["text_encoder"], "num_hidden_layers": 1, "intermediate_size": 256},
        "vae": {**config["vae"], "block_out_channels": [32] * len(config["vae"]["block_out_channels"]),
                "layers_per_block": 1},
    }


def build_random_pipeline(name: str, sample_size: int | None = None, seed: int = 0,
                          small: bool = False) -> StableDiffusionPipeline:
    """The architecture ``name`` with random weights; ``sample_size`` (latent pixels) shrinks the default,
    ``small`` the widths and depths (:func:`tiny`)."""
    config = tiny(architecture_config(name)) if small else architecture_config(name)
    torch.manual_seed(seed)
    unet_config = dict(config["unet"], sample_size=sample_size or config["unet"]["sample_size"])
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = config["text_encoder"]["max_position_embeddings"]
    text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"], bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL(**config["vae"]), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**unet_config).eval(), scheduler=DDIMScheduler(**config["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline

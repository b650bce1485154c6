"""Batched, seeded generation through the ordinary diffusers pipeline call.

Every image has its own ``torch.Generator`` seeded with its own seed, so an image depends on
(model, prompt, seed, sampler) and not on the other prompts in its batch. The same call gives
bit-identical images; a different batch size can move a pixel by one level in 8 bits (batched
float kernels round differently), which no metric here can see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Sampler:
    """The sampling protocol: DDIM with ``steps`` steps and classifier-free guidance ``guidance``."""

    steps: int = 25
    guidance: float = 6.0
    eta: float = 0.0


def use_ddim(pipeline: StableDiffusionPipeline) -> None:
    """Switch the pipeline to DDIM with the model's own noise schedule."""
    if not isinstance(pipeline.scheduler, DDIMScheduler):
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)


@torch.no_grad()
def generate(
    pipeline: StableDiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampler: Sampler = Sampler(),
    negative_prompts: Sequence[str] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    resolution: int | None = None,
) -> torch.Tensor:
    """Generate one image per (prompt, seed) pair; returns uint8 images (N, H, W, 3).

    ``resolution`` (pixels) defaults to the model's native size.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
        raise ValueError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")
    use_ddim(pipeline)
    device = pipeline.unet.device
    images = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generating", unit="batch", disable=not progress or len(starts) < 2):
        stop = start + batch_size
        generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds[start:stop]]
        output = pipeline(
            prompt=list(prompts[start:stop]),
            negative_prompt=None if negative_prompts is None else list(negative_prompts[start:stop]),
            num_inference_steps=sampler.steps, guidance_scale=sampler.guidance, eta=sampler.eta,
            generator=generators, output_type="np", height=resolution, width=resolution,
        ).images
        images.append(torch.from_numpy((np.clip(output, 0, 1) * 255).round().astype(np.uint8)))
    return torch.cat(images)


def to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1], the classifier's input."""
    return images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0

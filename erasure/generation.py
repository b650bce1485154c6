"""Batched, seeded generation through the ordinary diffusers pipeline call (SD-1.x/2.x, SDXL, FLUX).

Every image has its own ``torch.Generator`` seeded with its own seed, so an image depends on
(model, prompt, seed, sampler) and not on the other prompts in its batch. The same call gives
bit-identical images; a different batch size can move a pixel by one level in 8 bits (batched
float kernels round differently), which no metric here can see.

The :class:`Sampler` is the protocol for every family: SD and SDXL sample with DDIM and
classifier-free guidance ``guidance``; FLUX with its Euler sampler, ``guidance`` going in as the
guidance embedding of a guidance-distilled model (FLUX.1-dev) or as true classifier-free guidance
(``true_cfg_scale``, negative prompt "" unless given) otherwise; ``eta`` is DDIM's only.

A :class:`Guidance` replaces classifier-free guidance (inference-time methods such as Safe Latent
Diffusion; SD-1.x/2.x pipelines): the denoising loop then runs here, on the pipeline's own parts (prompt encoding,
initial latents, scheduler, decoding), so a guidance that returns plain CFG gives the pipeline
call's images bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from tqdm.auto import tqdm

from erasure.families import StableDiffusion, family_of


@dataclass(frozen=True)
class Sampler:
    """The sampling protocol: ``steps`` steps (DDIM; FLUX: Euler) with guidance ``guidance``."""

    steps: int = 25
    guidance: float = 6.0
    eta: float = 0.0


GuidanceStep = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class Guidance:
    """A replacement for classifier-free guidance in :func:`generate`.

    ``start(sampler)`` is called once per batch and returns that batch's step function
    ``step(i, eps_uncond, eps_cond, eps_extra) -> eps``: the noise the scheduler steps with at
    denoising step ``i`` (0-based) from the unconditional (negative-prompt) prediction, the prompt's
    prediction and the prediction for ``extra_prompt`` (None without one). A fresh step function per
    batch may keep state across the steps of its batch (a momentum), never across batches.
    """

    start: Callable[[Sampler], GuidanceStep]
    extra_prompt: str | None = None
    # the prompts' conditioning per step: (prompts, their encoded states, sampler) -> (step i -> states);
    # None: the encoded states at every step
    condition: Callable[[list[str], torch.Tensor, Sampler], Callable[[int], torch.Tensor]] | None = None


def use_ddim(pipeline) -> None:
    """Switch a UNet pipeline to DDIM with the model's own noise schedule (FLUX keeps its Euler sampler)."""
    if hasattr(pipeline, "unet") and not isinstance(pipeline.scheduler, DDIMScheduler):
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)


@torch.no_grad()
def generate(
    pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    sampler: Sampler = Sampler(),
    negative_prompts: Sequence[str] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    resolution: int | None = None,
    guidance: Guidance | None = None,
    prompt_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate one image per (prompt, seed) pair; returns uint8 images (N, H, W, 3).

    ``resolution`` (pixels) defaults to the model's native size; ``guidance`` replaces
    classifier-free guidance (None: the pipeline call itself). ``prompt_embeds`` (SD-1.x/2.x: N text-encoder
    states) are the conditioning in place of the encoded prompts, which then only count the images.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt")
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
        raise ValueError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")
    family = family_of(pipeline, resolution)
    if guidance is not None and not isinstance(family, StableDiffusion):
        raise ValueError(f"a guidance replacement runs the SD-1.x/2.x loop; this is a {family.name} pipeline")
    if prompt_embeds is not None and (guidance is not None or not isinstance(family, StableDiffusion)
                                      or len(prompt_embeds) != len(prompts)):
        raise ValueError("prompt_embeds take one row per prompt, on an SD-1.x/2.x pipeline, without a guidance replacement")
    use_ddim(pipeline)
    device = family.denoiser.device
    images = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generating", unit="batch", disable=not progress or len(starts) < 2):
        stop = start + batch_size
        generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds[start:stop]]
        negatives = None if negative_prompts is None else list(negative_prompts[start:stop])
        if guidance is None:
            text = ({"prompt": list(prompts[start:stop])} if prompt_embeds is None
                    else {"prompt_embeds": prompt_embeds[start:stop]})
            output = pipeline(
                **text, **family.call_arguments(sampler, negatives, len(generators)),
                generator=generators, output_type="np", height=family.resolution, width=family.resolution,
            ).images
        else:
            output = guided_batch(pipeline, list(prompts[start:stop]), negatives, generators, sampler, guidance,
                                  resolution)
        images.append(torch.from_numpy((np.clip(output, 0, 1) * 255).round().astype(np.uint8)))
    return torch.cat(images)


def guided_batch(pipeline: StableDiffusionPipeline, prompts: list[str], negative_prompts: list[str] | None,
                 generators: list[torch.Generator], sampler: Sampler, guidance: Guidance,
                 resolution: int | None) -> np.ndarray:
    """One batch of the pipeline call's DDIM loop with ``guidance`` in place of classifier-free
    guidance; float images (N, H, W, 3) in [0, 1]. The unconditional and conditional predictions
    are one UNet batch as in the pipeline call, the extra prediction a UNet call of its own, so the
    first two are the pipeline's to the bit."""
    device = pipeline._execution_device
    size = resolution or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    cond, uncond = pipeline.encode_prompt(prompts, device, 1, True, negative_prompts)
    both_embeds = torch.cat([uncond, cond])
    extra_embeds = None
    if guidance.extra_prompt is not None:
        extra_embeds = pipeline.encode_prompt([guidance.extra_prompt] * len(prompts), device, 1, False)[0]
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(sampler.steps, device=device)
    latents = pipeline.prepare_latents(len(prompts), pipeline.unet.config.in_channels, size, size, cond.dtype,
                                       device, generators)
    step_kwargs = pipeline.prepare_extra_step_kwargs(generators, sampler.eta)
    step = guidance.start(sampler)
    condition = guidance.condition(prompts, cond, sampler) if guidance.condition is not None else None
    for i, t in enumerate(scheduler.timesteps):
        if condition is not None:
            both_embeds = torch.cat([uncond, condition(i)])
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        both = pipeline.unet(model_input, t, encoder_hidden_states=both_embeds, return_dict=False)[0]
        eps_uncond, eps_cond = both.chunk(2)
        eps_extra = None
        if extra_embeds is not None:
            eps_extra = pipeline.unet(scheduler.scale_model_input(latents, t), t, encoder_hidden_states=extra_embeds,
                                      return_dict=False)[0]
        eps = step(i, eps_uncond, eps_cond, eps_extra)
        latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
    latents = latents / pipeline.vae.config.scaling_factor
    image = pipeline.vae.decode(latents, return_dict=False, generator=generators)[0]
    image, flagged = pipeline.run_safety_checker(image, device, cond.dtype)
    denormalize = [True] * len(image) if flagged is None else [not f for f in flagged]
    return pipeline.image_processor.postprocess(image, output_type="np", do_denormalize=denormalize)


def to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1], the classifier's input."""
    return images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0

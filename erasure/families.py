"""The model families the methods run on, behind one small interface.

=========  =====================  ==========================================  =====================
family     denoiser               conditioning                                noise and sampler
=========  =====================  ==========================================  =====================
``sd``     UNet2DConditionModel   CLIP hidden states (SD-1.x/2.x)             DDPM; DDIM + CFG
``sdxl``   UNet2DConditionModel   both CLIP encoders' hidden states (2048-d),  DDPM; DDIM + CFG
                                  pooled projection, size/crop time ids
``flux``   FluxTransformer2DModel T5 hidden states, pooled CLIP vector,        rectified flow;
                                  guidance embedding (guidance-distilled)     Euler + guidance
=========  =====================  ==========================================  =====================

A method sees latents as (batch, channels, height, width) and timesteps in the scheduler's
units (DDPM steps 0..999; for FLUX t = 1000 sigma), and a :class:`Conditioning`; the family turns
them into its denoiser's call (FLUX: latents packed into 2x2 patch tokens, ``timestep = t / 1000``)
and back. So an objective written for SD (ESD's target, a linear combination of predictions)
runs on SDXL and, in velocity space, on FLUX unchanged.

FLUX specifics. Noise: x_s = (1 - s) x_0 + s eps with s = t / 1000, and the model predicts the
velocity eps - x_0. Guidance: a guidance-distilled model (FLUX.1-dev, ``guidance_embeds``) has no
unconditional branch; it reads the guidance scale as an input. Every conditioning of such a model
carries the guidance embedding ``embedded_guidance`` (3.5, FluxPipeline's default), the empty
prompt's included: an "unconditional" prediction is the empty prompt's at the same guidance
embedding (the choice ESD's target needs). Sampling x_t then feeds the sampling guidance in
through the embedding and runs one prediction per step; a model without the embedding (the
toy world's FLUX model) samples with true classifier-free guidance, as ``true_cfg_scale``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from functools import cached_property

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

FLUX_DEFAULT_GUIDANCE = 3.5  # FluxPipeline's guidance_scale default, the embedding a dev model is queried at


@dataclass
class Conditioning:
    """What the denoiser is conditioned on, batch first.

    ``embeds`` the token context (SD/SDXL cross-attention, FLUX's T5 stream); ``pooled`` SDXL's
    ``text_embeds`` or FLUX's ``pooled_projections``; ``time_ids`` SDXL's size and crop ids;
    ``guidance`` FLUX.1-dev's guidance embedding input, one value per sample."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    guidance: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.embeds)

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """The same conditioning with ``function`` applied to each of its tensors."""
        return Conditioning(**{f.name: None if getattr(self, f.name) is None else function(getattr(self, f.name))
                               for f in fields(self)})

    def __getitem__(self, index) -> Conditioning:
        return self.map(lambda tensor: tensor[index])

    def repeat(self, times: int) -> Conditioning:
        """Each tensor repeated ``times`` along the batch (as ``Tensor.repeat``: the whole batch, then again)."""
        return self.map(lambda tensor: tensor.repeat(times, *[1] * (tensor.dim() - 1)))

    def to(self, *args, **kwargs) -> Conditioning:
        return self.map(lambda tensor: tensor.to(*args, **kwargs))

    def detach(self) -> Conditioning:
        return self.map(torch.Tensor.detach)

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """The batches of ``parts`` one after the other."""
        first = parts[0]
        return Conditioning(**{f.name: None if getattr(first, f.name) is None else
                               torch.cat([getattr(p, f.name) for p in parts]) for f in fields(first)})


def as_conditioning(condition: Conditioning | torch.Tensor) -> Conditioning:
    """A bare tensor is an SD-1.x/2.x token context (what attacks that craft embeddings pass)."""
    return condition if isinstance(condition, Conditioning) else Conditioning(condition)


class Family:
    """One model family's prompt encoding, denoiser call, noise process and sampler."""

    name: str
    denoiser_name: str = "unet"

    def __init__(self, pipeline, resolution: int | None = None):
        self.pipeline = pipeline
        self.resolution = resolution or self.native_resolution()

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    def native_resolution(self) -> int:
        """Pixels of the model's default image side."""
        return self.pipeline.unet.config.sample_size * self.pipeline.vae_scale_factor

    @property
    def latent_size(self) -> int:
        return self.resolution // self.pipeline.vae_scale_factor

    @property
    def context_tokenizer(self):
        """The tokenizer whose ids make the token context the denoiser reads (SDXL's second CLIP
        tokenizer has the same vocabulary and ids as the first)."""
        return self.pipeline.tokenizer

    @property
    def latent_channels(self) -> int:
        return self.pipeline.vae.config.latent_channels

    # ----- prompts -------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        """The pipeline's own prompt encoding (no classifier-free-guidance pair)."""
        return Conditioning(self.pipeline.encode_prompt(list(prompts), device, 1, do_classifier_free_guidance=False)[0])

    # ----- the denoiser --------------------------------------------------------------------
    def inputs(self, latents: torch.Tensor, t: torch.Tensor, condition: Conditioning) -> dict:
        """Keyword arguments of the denoiser's forward."""
        return {"sample": latents, "timestep": t, "encoder_hidden_states": condition.embeds}

    def output(self, output, latents: torch.Tensor) -> torch.Tensor:
        """The prediction, shaped as ``latents``."""
        return output.sample

    # ----- noise ---------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return self.pipeline.scheduler.config.num_train_timesteps

    def draw_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Training timesteps, uniformly: DDPM steps 0..T-1."""
        return torch.randint(0, self.num_train_timesteps, (count,), generator=generator)

    def timestep_grid(self, count: int) -> torch.Tensor:
        """``count`` training timesteps spread over the schedule, each in the middle of its bin:
        T//count//2 + i·(T//count), i = 0..count-1 (UnlearnDiffAtk's ``sampled_t``,
        OPTML-Group/Diffusion-MU-Attack src/tasks/classifier_.py: 10, 30, ..., 990 for 50 of 1000)."""
        step = max(self.num_train_timesteps // count, 1)
        return torch.arange(step // 2, self.num_train_timesteps, step)[:count]

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.noise_schedule.add_noise(latents, noise, t.cpu()).to(latents)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model predicts for ``add_noise(latents, noise, t)``: eps, or v for v-prediction models."""
        if self.noise_schedule.config.prediction_type == "v_prediction":
            return self.noise_schedule.get_velocity(latents, noise, t.cpu()).to(latents)
        return noise

    @cached_property
    def noise_schedule(self) -> DDPMScheduler:
        return DDPMScheduler.from_config(self.pipeline.scheduler.config)

    # ----- sampling --------------------------------------------------------------------------
    def sampling_scheduler(self, steps: int):
        scheduler = DDIMScheduler.from_config(self.pipeline.scheduler.config)
        scheduler.set_timesteps(steps)
        return scheduler

    def describe_sampler(self, sampler) -> str:
        """The sampler as the run's protocol record names it."""
        return f"DDIM, {sampler.steps} steps, eta {sampler.eta}"

    def guided(self, predict: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor],
               latents: torch.Tensor, t: torch.Tensor, condition: Conditioning, unconditional: Conditioning,
               guidance: float) -> torch.Tensor:
        """The guided prediction a sampling step uses: classifier-free guidance, one batched call."""
        both = predict(torch.cat([latents, latents]), t, Conditioning.cat([unconditional, condition]))
        uncond, cond = both.chunk(2)
        return uncond + guidance * (cond - uncond)

    def call_arguments(self, sampler, negative_prompts: list[str] | None, count: int) -> dict:
        """The pipeline call's sampler arguments (steps, guidance, eta, negative prompts)."""
        return {"num_inference_steps": sampler.steps, "guidance_scale": sampler.guidance, "eta": sampler.eta,
                "negative_prompt": negative_prompts}

    def latents_from_vae(self, posterior_mean: torch.Tensor) -> torch.Tensor:
        return posterior_mean * self.pipeline.vae.config.scaling_factor


class StableDiffusion(Family):
    name = "sd"


class StableDiffusionXL(Family):
    """Two text encoders, pooled embeddings, size/crop time ids (the pipeline's defaults: original and
    target size the image size, no crop). The empty prompt encodes to zeros when the pipeline's
    ``force_zeros_for_empty_prompt`` (SDXL base) is set, as the pipeline's own unconditional branch."""

    name = "sdxl"

    def encode(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        pipeline = self.pipeline
        embeds, _, pooled, _ = pipeline.encode_prompt(list(prompts), device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        if pipeline.config.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        size = (self.resolution, self.resolution)
        time_ids = pipeline._get_add_time_ids(size, (0, 0), size, embeds.dtype,
                                              pipeline.text_encoder_2.config.projection_dim)
        return Conditioning(embeds, pooled, time_ids.to(device).repeat(len(prompts), 1))

    def inputs(self, latents: torch.Tensor, t: torch.Tensor, condition: Conditioning) -> dict:
        return {**super().inputs(latents, t, condition),
                "added_cond_kwargs": {"text_embeds": condition.pooled, "time_ids": condition.time_ids}}


class Flux(Family):
    """FLUX (see the module docstring)."""

    name = "flux"
    denoiser_name = "transformer"

    def __init__(self, pipeline, resolution: int | None = None, embedded_guidance: float = FLUX_DEFAULT_GUIDANCE):
        super().__init__(pipeline, resolution)
        self.embedded_guidance = embedded_guidance
        if self.latent_size % 2:
            raise ValueError(f"FLUX packs 2x2 latent patches: resolution {self.resolution} gives an odd latent "
                             f"side {self.latent_size}; use a multiple of {2 * pipeline.vae_scale_factor}")

    @property
    def distilled(self) -> bool:
        """Guidance-distilled (FLUX.1-dev): guidance is an input, there is no unconditional branch."""
        return bool(self.pipeline.transformer.config.guidance_embeds)

    def native_resolution(self) -> int:
        return self.pipeline.vae.config.sample_size

    @property
    def latent_channels(self) -> int:
        return self.pipeline.transformer.config.in_channels // 4

    @property
    def context_tokenizer(self):
        """T5's: its states are the token stream (CLIP gives only the pooled vector)."""
        return self.pipeline.tokenizer_2

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens per prompt: 512 for a guidance-distilled model (FLUX.1-dev), 256 otherwise (FLUX.1-schnell,
        trained at 256), capped by the tokenizer; the UCE authors' FLUX edit encodes its keys at the same
        lengths (``trainscripts/uce_flux_edit.py``). FLUX's T5 reads its padding (no attention mask), so keys
        and sampling must use one length."""
        return min(self.pipeline.tokenizer_2.model_max_length, 512 if self.distilled else 256)

    def encode(self, prompts: Sequence[str], device: torch.device) -> Conditioning:
        embeds, pooled, _ = self.pipeline.encode_prompt(list(prompts), None, device=device, num_images_per_prompt=1,
                                                        max_sequence_length=self.max_sequence_length)
        guidance = torch.full((len(prompts),), self.embedded_guidance, device=device) if self.distilled else None
        return Conditioning(embeds, pooled, guidance=guidance)

    def inputs(self, latents: torch.Tensor, t: torch.Tensor, condition: Conditioning) -> dict:
        batch, channels, height, width = latents.shape
        return {
            "hidden_states": FluxPipeline._pack_latents(latents, batch, channels, height, width),
            "timestep": (t.expand(batch) if t.dim() == 0 else t).to(latents.dtype) / 1000,
            "guidance": condition.guidance, "pooled_projections": condition.pooled,
            "encoder_hidden_states": condition.embeds,
            "txt_ids": torch.zeros(condition.embeds.shape[1], 3, device=latents.device, dtype=latents.dtype),
            "img_ids": FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device,
                                                              latents.dtype),
        }

    def output(self, output, latents: torch.Tensor) -> torch.Tensor:
        scale = self.pipeline.vae_scale_factor
        return FluxPipeline._unpack_latents(output.sample, latents.shape[2] * scale, latents.shape[3] * scale, scale)

    def draw_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """t = 1000 s with s uniform on {1/T, ..., 1}."""
        return (torch.randint(0, self.num_train_timesteps, (count,), generator=generator) + 1).float() * (
            1000 / self.num_train_timesteps)

    def timestep_grid(self, count: int) -> torch.Tensor:
        """The DDPM grid of :meth:`Family.timestep_grid` as t = 1000 s."""
        return super().timestep_grid(count).float() * (1000 / self.num_train_timesteps)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = (t.to(latents) / 1000).view(-1, *[1] * (latents.dim() - 1))
        return (1 - s) * latents + s * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - latents

    @cached_property
    def noise_schedule(self):
        raise TypeError("FLUX is a flow-matching model: it has no DDPM noise schedule")

    def sampling_scheduler(self, steps: int) -> FlowMatchEulerDiscreteScheduler:
        """FluxPipeline's schedule: sigmas linspace(1, 1/steps), shifted by the image's token count."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        config = scheduler.config
        tokens = (self.latent_size // 2) ** 2
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return scheduler

    def describe_sampler(self, sampler) -> str:
        guidance = "embedded guidance" if self.distilled else "true classifier-free guidance"
        config = self.pipeline.scheduler.config
        shift = "shifted by the token count" if config.get("use_dynamic_shifting") else f"shift {config.get('shift', 1.0)}"
        return f"Euler (FluxPipeline's flow-matching schedule, {shift}), {sampler.steps} steps, {guidance}"

    def guided(self, predict, latents, t, condition, unconditional, guidance):
        """Distilled: one prediction at guidance embedding ``guidance``; otherwise true CFG."""
        if self.distilled:
            return predict(latents, t, replace(condition, guidance=torch.full_like(condition.guidance, guidance)))
        return super().guided(predict, latents, t, condition, unconditional, guidance)

    def call_arguments(self, sampler, negative_prompts: list[str] | None, count: int) -> dict:
        arguments = {"num_inference_steps": sampler.steps, "max_sequence_length": self.max_sequence_length}
        if self.distilled:
            if negative_prompts is not None:
                raise ValueError("negative prompts need classifier-free guidance, and this FLUX model is "
                                 "guidance-distilled (guidance_embeds): use a template without a negative prompt")
            return {**arguments, "guidance_scale": sampler.guidance}
        negatives = negative_prompts if negative_prompts is not None else [""] * count
        return {**arguments, "true_cfg_scale": sampler.guidance, "negative_prompt": negatives}

    def latents_from_vae(self, posterior_mean: torch.Tensor) -> torch.Tensor:
        config = self.pipeline.vae.config
        return (posterior_mean - config.shift_factor) * config.scaling_factor


def family_of(pipeline, resolution: int | None = None) -> Family:
    """The :class:`Family` of a loaded pipeline, at ``resolution`` pixels (default: the model's)."""
    if isinstance(pipeline, FluxPipeline):
        return Flux(pipeline, resolution)
    if isinstance(pipeline, StableDiffusionXLPipeline):
        return StableDiffusionXL(pipeline, resolution)
    return StableDiffusion(pipeline, resolution)

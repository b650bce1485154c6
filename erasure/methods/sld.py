"""Safe Latent Diffusion's safety guidance (Schramowski et al., CVPR 2023) as an inference-time baseline.

No weight changes: at generation time classifier-free guidance is replaced by SLD's safety
guidance, with the erased concepts as the safety concept S: each concept through
``method.prompt_template`` (default "{concept}"), joined by ", " ("circle, star");
``method.safety_concept`` replaces the whole text (e.g. the paper's long I2P concept list).
With ε_∅, ε_p and ε_S the unconditional, prompt and safety-concept noise predictions at
denoising step t and s_g the sampler's guidance scale:

    ε̃   = ε_∅ + s_g (ε_p − ε_∅ − γ_t)
    γ_t = μ(ε_p, ε_S; s_S, λ) ⊙ (ε_S − ε_∅) + s_m ν_t
    μ   = clamp(s_S |ε_p − ε_S|, max 1)  elementwise where ε_p − ε_S < λ, else 0
    ν_{t+1} = β_m ν_t + (1 − β_m) γ_t,   ν_0 = 0

γ_t is subtracted only from step δ on (the warm-up: the first δ steps, which lay out the image,
are plain CFG); the momentum ν builds up from the first step, warm-up included, as in the
reference implementation. s_S = 0 gives plain CFG images exactly (μ = 0, so γ = ν = 0); unlike
diffusers, which switches SLD off for any s_S <= 1, a small s_S is applied as the formula says.

Presets (``method.preset``; each value can be overridden, e.g. ``method.sld_guidance_scale=500``),
the paper's four configurations (its hyperparameter table, Hyp-Weak/-Medium/-Strong/-Max, reproduced
in the authors' model card AIML-TUDA/stable-diffusion-safe); ``medium`` is the paper's recommended one,
the default of the authors' pipeline (ml-research/safe-latent-diffusion, src/sld/sld_pipeline.py at
a42923c) and this method's:

    preset   δ sld_warmup_steps   s_S sld_guidance_scale   λ sld_threshold   s_m sld_momentum_scale   β_m sld_mom_beta
    weak     15                   200                      0.0               0.0                      0.0
    medium   10                   1000                     0.01              0.3                      0.4
    strong   7                    2000                     0.025             0.5                      0.7
    max      0                    5000                     1.0               0.5                      0.7

The one difference to diffusers' ``SafetyConfig`` (StableDiffusionPipelineSafe): its ``WEAK`` has s_S = 20,
the paper's table 200. The paper gives no β_m for weak (s_m = 0: the momentum never enters γ_t); 0 here,
as diffusers.

The paper's safety text for inappropriate content (I2P) is :data:`I2P_SAFETY_CONCEPT`, the default
``safety_concept`` of the authors' pipeline; diffusers' pipeline prefixes it with "an image showing ".
The nudity protocol sets it (``method.safety_concept``).

The warm-up δ counts steps of the paper's 50-step sampler. ``method.warmup=relative`` (default)
keeps the same share of the trajectory on a sampler with another number of steps N: guidance
starts at step ceil(δ N / 50) (medium on 25 steps: 5); ``method.warmup=absolute`` takes δ as a
number of the sampler's own steps, as diffusers does (medium on 25 steps: 10 of 25 unguided).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from erasure.generation import Guidance, GuidanceStep, Sampler
from erasure.methods.base import InferenceTimeEraser, MethodConfig

PAPER_STEPS = 50  # the paper's sampler: the warm-up's unit
I2P_SAFETY_CONCEPT = ("hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, "
                      "bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, "
                      "child abuse, brutality, cruelty")


@dataclass(frozen=True)
class SafetyParameters:
    """SLD's hyperparameters: warm-up δ, guidance scale s_S, threshold λ, momentum scale s_m, momentum β_m."""

    sld_warmup_steps: int
    sld_guidance_scale: float
    sld_threshold: float
    sld_momentum_scale: float
    sld_mom_beta: float


PRESETS = {
    "weak": SafetyParameters(15, 200.0, 0.0, 0.0, 0.0),
    "medium": SafetyParameters(10, 1000.0, 0.01, 0.3, 0.4),
    "strong": SafetyParameters(7, 2000.0, 0.025, 0.5, 0.7),
    "max": SafetyParameters(0, 5000.0, 1.0, 0.5, 0.7),
}


@dataclass
class SLDConfig(MethodConfig):
    name: str = "sld"
    preset: str = "medium"  # weak | medium | strong | max
    # null: the preset's value
    sld_warmup_steps: int | None = None
    sld_guidance_scale: float | None = None
    sld_threshold: float | None = None
    sld_momentum_scale: float | None = None
    sld_mom_beta: float | None = None
    warmup: str = "relative"  # relative: δ in steps of a 50-step sampler | absolute: in the sampler's steps
    prompt_template: str = "{concept}"  # the safety text of one erased concept
    safety_concept: str | None = None  # the whole safety text; null: the concepts' texts joined by ", "


def resolve(config: SLDConfig) -> SafetyParameters:
    """The preset with the config's overrides; ValueError (one line) for a value SLD cannot use."""
    if config.preset not in PRESETS:
        raise ValueError(f"invalid value for 'method.preset': {config.preset!r}; choose one of: {', '.join(PRESETS)}")
    preset = asdict(PRESETS[config.preset])
    chosen = {key: preset[key] if getattr(config, key) is None else getattr(config, key) for key in preset}
    parameters = SafetyParameters(**{key: type(preset[key])(value) for key, value in chosen.items()})
    for key, value in asdict(parameters).items():
        if not math.isfinite(value):
            raise ValueError(f"'method.{key}' must be a finite number, got {value}")
    for key in ("sld_warmup_steps", "sld_guidance_scale", "sld_momentum_scale"):
        if getattr(parameters, key) < 0:
            raise ValueError(f"'method.{key}' must be at least 0, got {getattr(parameters, key)}")
    if not 0 <= parameters.sld_mom_beta < 1:
        raise ValueError(f"'method.sld_mom_beta' must be in [0, 1), got {parameters.sld_mom_beta}")
    return parameters


def warmup_steps(parameters: SafetyParameters, steps: int, mode: str = "relative") -> int:
    """The number of unguided steps on a sampler of ``steps`` steps (see the module docstring)."""
    if mode == "absolute":
        return parameters.sld_warmup_steps
    return math.ceil(parameters.sld_warmup_steps * steps / PAPER_STEPS)


def safety_term(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, eps_safety: torch.Tensor, momentum: torch.Tensor,
                parameters: SafetyParameters) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ_t, ν_{t+1}) of one step from ε_∅, ε_p, ε_S and ν_t."""
    difference = eps_cond - eps_safety
    scale = (parameters.sld_guidance_scale * difference.abs()).clamp(max=1.0)
    mu = torch.where(difference < parameters.sld_threshold, scale, torch.zeros_like(scale))
    gamma = mu * (eps_safety - eps_uncond) + parameters.sld_momentum_scale * momentum
    return gamma, parameters.sld_mom_beta * momentum + (1 - parameters.sld_mom_beta) * gamma


class SafetyGuidance:
    """The step function of one batch (:class:`erasure.generation.Guidance`); it holds the momentum ν."""

    def __init__(self, parameters: SafetyParameters, guidance_scale: float, warmup: int):
        self.parameters, self.guidance_scale, self.warmup = parameters, guidance_scale, warmup
        self.momentum: torch.Tensor | None = None

    def __call__(self, step: int, eps_uncond: torch.Tensor, eps_cond: torch.Tensor,
                 eps_safety: torch.Tensor | None) -> torch.Tensor:
        if self.momentum is None:
            self.momentum = torch.zeros_like(eps_cond)
        gamma, self.momentum = safety_term(eps_uncond, eps_cond, eps_safety, self.momentum, self.parameters)
        if step < self.warmup:
            return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)
        return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond - gamma)


class SLD(InferenceTimeEraser):
    """The result is the guidance rule, ``sld.json`` (the resolved hyperparameters and the safety text)."""

    name = "sld"
    Config = SLDConfig
    families = ("sd",)  # its guidance replaces the SD pipeline's classifier-free guidance step
    choices = {"preset": tuple(PRESETS), "warmup": ("relative", "absolute")}
    needs = {"prompt_template": "concept_prompt", "safety_concept": "safety_text"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.safety = resolve(self.config)
        template = self.config.prompt_template
        self.safety_text = self.config.safety_concept or ", ".join(template.format(concept=c) for c in self.concepts)

    @classmethod
    def check(cls, config: SLDConfig, concepts: Sequence[str]) -> None:
        resolve(config)
        if config.safety_concept is not None and not config.safety_concept.strip():
            raise ValueError("'method.safety_concept' is empty; give the text to steer away from, or null for the "
                             "erased concepts through method.prompt_template")

    def guidance_for_generation(self) -> Guidance:
        def start(sampler: Sampler) -> GuidanceStep:
            warmup = warmup_steps(self.safety, sampler.steps, self.config.warmup)
            return SafetyGuidance(self.safety, sampler.guidance, warmup)

        return Guidance(start=start, extra_prompt=self.safety_text)

    def rule(self) -> dict[str, Any]:
        return {**super().rule(), "safety_text": self.safety_text, "resolved": asdict(self.safety)}

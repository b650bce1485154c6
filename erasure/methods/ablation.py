"""Concept Ablation (Kumari et al., "Ablating Concepts in Text-to-Image Diffusion Models", ICCV 2023).

An anchor prompt c ("a red square") and its target prompt c* (the same prompt naming the
erased concept: "a red circle"). x_t is a noised latent of an *anchor image*, generated once
by the base model from anchor prompts and cached in the run directory. The model-based
objective (default) maps the target prompt onto the anchor's prediction,

    L(Phi_hat(x_t, c*, t), sg(Phi(x_t, c, t))),

the noise-based one onto the noise, L(Phi_hat(x_t, c*, t), eps), and an optional prior
preservation term adds ``prior_weight`` * L(Phi_hat(x_t, c, t), eps) on the anchor pairs
(L = ``method.loss``; t ~ U{0..T-1}; for v-prediction models eps is replaced by the velocity v).

The anchor, its prompts and the words prompts use for the concepts come from the protocol
(``method.anchor``, ``method.anchor_prompts``, ``method.words``); ``method.target_template``
builds target prompts by a template instead of substituting the anchor's word
("{anchor_prompt} in the style of {concept}" for artist styles).

Phi is the frozen original model by default (``anchor_model=frozen``, as in the f-divergence
paper, Novello et al. 2026); the reference code uses the current model under no_grad
(``anchor_model=current``).

Parameter groups: ``xattn-kv`` attn2.to_k/to_v (default; styles and objects), ``attn`` every
attention projection, ``full`` every Linear/Conv2d.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from erasure import layers
from erasure.generation import Sampler
from erasure.io import atomic_save_tensors
from erasure.losses import LOSSES
from erasure.methods.base import EraserModule, MethodConfig

PARAMETER_GROUPS = {"xattn-kv": layers.CROSS_ATTENTION_KV, "attn": layers.ATTENTION, "full": layers.EVERYTHING}
ANCHORS_FILE = "anchors.safetensors"


@dataclass
class AblationConfig(MethodConfig):
    name: str = "ablation"
    anchor: str = ""  # the anchor concept (another concept or a superclass); the protocol gives one
    anchor_prompts: list[str] = field(default_factory=list)  # prompts naming the anchor (the protocol's)
    words: dict[str, str] = field(default_factory=dict)  # how prompts spell a concept, where not by its name
    target_template: str | None = None  # e.g. "{anchor_prompt} in the style of {concept}"; None: substitute
    variant: str = "model"  # model | noise
    anchor_model: str = "frozen"  # frozen | current
    parameters: str = "xattn-kv"
    prior_weight: float = 0.0
    num_anchor_images: int = 64
    anchor_steps: int = 25
    anchor_guidance: float = 6.0
    lr: float = 1e-5
    batch_size: int = 4


ABLATION_CHOICES = {"variant": ("model", "noise"), "anchor_model": ("frozen", "current")}


def target_prompt(anchor_prompt: str, anchor: str, concept: str, words: dict[str, str] | None = None,
                  template: str | None = None) -> str:
    """The anchor prompt rewritten to name the erased concept instead of the anchor (or, with a
    ``template``, ``template.format(anchor_prompt=..., concept=...)``)."""
    words = words or {}
    if template:
        return template.format(anchor_prompt=anchor_prompt, concept=words.get(concept, concept))
    anchor_word, concept_word = words.get(anchor, anchor), words.get(concept, concept)
    rewritten = re.sub(rf"\b{re.escape(anchor_word)}\b", concept_word, anchor_prompt)
    return re.sub(r"\ban (?=[^aeiou])", "a ", re.sub(r"\ba (?=[aeiou])", "an ", rewritten))


def check_anchor(config: AblationConfig, concepts: Sequence[str]) -> None:
    """One-line errors for an anchor that cannot be ablated towards."""
    if not config.anchor_prompts:
        raise ValueError("Concept Ablation needs anchor prompts: set method.anchor=<concept or superclass> and "
                         "method.anchor_prompts=[...] (the protocol gives them for its own concepts)")


class Anchors:
    """Anchor latents with their prompts, generated once by the base model and cached on disk."""

    def __init__(self, latents: torch.Tensor, prompts: list[str]):
        self.latents, self.prompts = latents, prompts

    @classmethod
    def load_or_generate(cls, module: EraserModule, config: AblationConfig, cache: Path) -> Anchors:
        prompts = [config.anchor_prompts[i % len(config.anchor_prompts)] for i in range(config.num_anchor_images)]
        if cache.exists():
            stored = load_file(cache)
            return cls(stored["latents"].to(module.device), prompts)
        images = module.generate(prompts, list(range(len(prompts))),
                                 Sampler(config.anchor_steps, config.anchor_guidance), original=True)
        latents = module.encode_images(images)
        atomic_save_tensors({"latents": latents}, cache)  # every DDP rank makes the same file
        return cls(latents, prompts)


def ablation_loss(module: EraserModule, config: AblationConfig, anchors: Anchors) -> torch.Tensor:
    """One Concept Ablation step's loss for ``module`` (an Ablation or a LoRA eraser)."""
    generator = module.step_generator()
    picks = torch.randint(len(anchors.prompts), (config.batch_size,), generator=generator).tolist()
    concepts = torch.randint(len(module.concepts), (config.batch_size,), generator=generator).tolist()
    anchor_prompts = [anchors.prompts[i] for i in picks]
    target_prompts = [target_prompt(p, config.anchor, module.concepts[c], config.words, config.target_template)
                      for p, c in zip(anchor_prompts, concepts)]
    latents = anchors.latents[picks]
    x_t, noise, t = module.add_noise(latents, generator)
    noise_target = module.noise_target(latents, noise, t)
    anchor_embeds, target_embeds = module.encode(anchor_prompts), module.encode(target_prompts)
    if config.variant == "noise":
        target = noise_target
    elif config.anchor_model == "frozen":
        target = module.predict_frozen(x_t, t, anchor_embeds)
    else:
        with torch.no_grad():
            target = module.predict(x_t, t, anchor_embeds)
    loss = module.loss(module.predict(x_t, t, target_embeds), target)
    if config.prior_weight:
        loss = loss + config.prior_weight * module.loss(module.predict(x_t, t, anchor_embeds), noise_target)
    return loss


class Ablation(EraserModule):
    name = "ablation"
    Config = AblationConfig
    choices = {"loss": tuple(LOSSES), "parameters": tuple(PARAMETER_GROUPS), **ABLATION_CHOICES}

    @classmethod
    def check(cls, config: AblationConfig, concepts: Sequence[str]) -> None:
        check_anchor(config, concepts)

    def trained_layers(self) -> layers.Selector:
        return PARAMETER_GROUPS[self.config.parameters]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.anchors = Anchors.load_or_generate(self, self.config, Path(self.trainer.default_root_dir) / ANCHORS_FILE)

    def objective(self) -> torch.Tensor:
        return ablation_loss(self, self.config, self.anchors)

"""Concept Ablation (Kumari et al., "Ablating Concepts in Text-to-Image Diffusion Models", ICCV 2023).

Reference: nupurkmr9/concept-ablation at c11fb1b (``diffusers/train.py`` and ``diffusers/README.md``,
``compvis/train.py``, ``configs/finetune_{style,object}.yaml``, ``src/utils.py``); the conformance page
(docs/conformance.md) lists what is equal and what differs.

An anchor prompt c ("a red square") and its target prompt c* (the same prompt naming the
erased concept: "a red circle"). x_t is a noised latent of an *anchor image*, generated once
by the base model from anchor prompts and cached in the run directory. The model-based
objective (default) maps the target prompt onto the anchor's prediction,

    L(Phi_hat(x_t, c*, t), sg(Phi(x_t, c, t))),

the noise-based one onto the noise, L(Phi_hat(x_t, c*, t), eps) (L = ``method.loss``;
t ~ U{0..T-1}; for v-prediction models eps is replaced by the velocity v).

Prior preservation (``prior_weight`` > 0) adds ``prior_weight`` * L(Phi_hat(x'_t', c', t'), eps')
on a *separate anchor half-batch*: ``batch_size`` more anchor images with their own anchor
prompts c', noise eps' and timesteps t', as both reference codes draw it (the diffusers
train.py concatenates a class half-batch to the instance half-batch; the CompVis train.py
pairs a regularisation batch with the ablation batch; noise and t are drawn per sample).
Each term is the mean over its own half-batch, so ``prior_weight`` is the prior term's weight
relative to the ablation term: the diffusers code adds ``--prior_loss_weight`` (default 1.0)
times the prior loss, reproduced by ``prior_weight=1``; the CompVis code computes
``0.2 * loss_regularisation + loss_ablation``, reproduced by ``prior_weight=0.2``.

Target prompts: the anchor's word (``method.words`` gives how prompts spell a concept) is
replaced, as a whole word and case-insensitively, by the concept's word ("A Red Square" ->
"A Red Circle"); only an article directly before the replaced word is changed to fit it
("a square" -> "an octagon"; "an hour with a square" -> "an hour with a circle"). The reference
codes substitute with ``str.replace`` (CompVis: on the lower-cased prompt). ``target_template``
builds the target prompt from a template instead: a format string with ``{anchor_prompt}`` and
``{concept}`` ("{anchor_prompt} in the style of {concept}"), or the name of one of the
reference's template sets in :data:`TARGET_TEMPLATE_SETS`, one template drawn per sample.

Anchor images: ``num_anchor_images`` images of the anchor prompts in turn, sampled by the base model with
DDIM, ``anchor_steps`` steps, guidance ``anchor_guidance`` and eta ``anchor_eta``. The authors' diffusers
train.py samples its ``--num_class_images`` (1,000) with 25 steps, guidance 6 and eta 1, the last
unused there (its DPM-Solver++ scheduler takes no eta); the CompVis code (compvis/preprocessing.py,
src/utils.py ``sample``) with DDIM, 200 steps, guidance 6, eta 1.

Anchors of unsafe concepts: with ``anchor_negative_prompt`` the anchor images are generated
with the erased concepts as the negative prompt, so that anchor prompts about people do not
yield anchor images showing the concept (the authors' answer in the reference repository's
issue 13: anchor prompts about bodies can give unsafe anchor images). The cache ``anchors.safetensors`` stores the prompts,
negative prompts and sampler it was generated with and is regenerated when they differ.

The start-of-text token's cross-attention key and value are detached during the trained
predictions (``detach_start_token``, default as both reference codes, whose cross-attention
multiplies k and v at position 0 into their detached values): that token's hidden state is the
same for every prompt, so training its key and value would shift every prompt. Values are
unchanged; only the gradient through position 0 is removed.

Phi is the frozen original model by default (``anchor_model=frozen``, as in the f-divergence
paper, Novello et al. 2026); the reference code uses the current model under no_grad
(``anchor_model=current``, as the SD presets set it).

Optimisation as the reference codes: AdamW with weight decay 1e-2 (``optimizer=adamw``,
``weight_decay``; ``optimizer=adam`` is plain Adam without decay), gradients clipped to norm
``max_grad_norm`` = 1.0 (the diffusers code's ``--max_grad_norm``; None: no clipping), and
with ``scale_lr`` the learning rate multiplied by the samples per step, ``batch_size`` (twice
that with the prior half-batch) times the number of devices, as the diffusers code's
``--scale_lr`` (lr x batch x processes, x2 with prior preservation) and the CompVis code's
``scale_lr`` (lr x GPUs x batch, both halves counted).

Parameter groups: ``xattn-kv`` attn2.to_k/to_v (default; styles and objects), ``attn`` every
attention projection, ``full`` every Linear/Conv2d.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from erasure import layers
from erasure.generation import Sampler
from erasure.io import atomic_save_tensors
from erasure.losses import LOSSES
from erasure.adapters import ADAPTER_CHOICES, AdapterOptions
from erasure.methods.base import EraserModule, MethodConfig

PARAMETER_GROUPS = {"xattn-kv": layers.CROSS_ATTENTION_KV, "attn": layers.ATTENTION, "full": layers.EVERYTHING}
ANCHORS_FILE = "anchors.safetensors"
ANCHORS_SOURCE = "generated_from"  # the cache's metadata key: the prompts and sampler of its latents

# The reference's style templates; a set named as ``target_template`` draws one per sample.
TARGET_TEMPLATE_SETS = {
    # diffusers utils.py (CustomDiffusionDataset.__getprompt__): r ~ U{0, 1, 2}, the second form for r = 1 and 2
    "style-diffusers": ("{anchor_prompt}, in the style of {concept}",
                        "in {concept}'s style, {anchor_prompt}",
                        "in {concept}'s style, {anchor_prompt}"),
    # CompVis src/finetune_data.py (get_styled_prompt): three forms, each with the name once or twice
    "style-compvis": ("{anchor_prompt}, in the style of {concept}",
                      "{anchor_prompt}, in the style of {concept} {concept}",
                      "{concept} inspired painting, {anchor_prompt}",
                      "{concept} {concept} inspired painting, {anchor_prompt}",
                      "in {concept}'s style, {anchor_prompt}",
                      "in {concept} {concept}'s style, {anchor_prompt}"),
}


@dataclass
class AblationConfig(AdapterOptions, MethodConfig):
    name: str = "ablation"
    anchor: str = ""  # the anchor concept (another concept or a superclass); the protocol gives one
    anchor_prompts: list[str] = field(default_factory=list)  # prompts naming the anchor (the protocol's)
    words: dict[str, str] = field(default_factory=dict)  # how prompts spell a concept, where not by its name
    target_template: str | None = None  # a format string or a TARGET_TEMPLATE_SETS name; None: substitute
    variant: str = "model"  # model | noise
    anchor_model: str = "frozen"  # frozen | current
    parameters: str = "xattn-kv"
    prior_weight: float = 0.0  # weight of the prior term on its own anchor half-batch (diffusers 1.0, CompVis 0.2)
    detach_start_token: bool = True  # no gradient through the start token's cross-attention k/v (reference; no effect on FLUX, whose T5 has no start token)
    optimizer: str = "adamw"  # adamw (reference) | adam
    weight_decay: float = 1e-2  # AdamW's decoupled weight decay (reference)
    max_grad_norm: float | None = 1.0  # gradient-norm clipping (reference); None: none
    scale_lr: bool = False  # lr x samples per step x devices, as the reference's --scale_lr
    anchor_negative_prompt: bool = False  # generate anchor images with the erased concepts as negative prompt
    num_anchor_images: int = 64
    anchor_steps: int = 25
    anchor_guidance: float = 6.0
    anchor_eta: float = 0.0  # DDIM eta of the anchor images (the reference codes pass 1.0)
    lr: float = 1e-5
    batch_size: int = 4


ABLATION_CHOICES = {"variant": ("model", "noise"), "anchor_model": ("frozen", "current"), "optimizer": ("adamw", "adam")}


def target_prompt(anchor_prompt: str, anchor: str, concept: str, words: dict[str, str] | None = None,
                  template: str | None = None) -> str:
    """The anchor prompt rewritten to name the erased concept instead of the anchor (or, with a
    ``template``, ``template.format(anchor_prompt=..., concept=...)``).

    The anchor's word is matched as a whole word in any case; a capitalised match gives a
    capitalised concept word, and an article ("a"/"an") directly before it is fitted to the
    concept word's first letter (a vowel letter takes "an")."""
    words = words or {}
    concept_word = words.get(concept, concept)
    if template:
        return template.format(anchor_prompt=anchor_prompt, concept=concept_word)

    def substitute(match: re.Match) -> str:
        article, word = match.group(1), match.group(2)
        replacement = concept_word[:1].upper() + concept_word[1:] if word[:1].isupper() else concept_word
        if article is None:
            return replacement
        fitted = "an" if concept_word[:1].lower() in "aeiou" else "a"
        return f"{fitted.capitalize() if article[0].isupper() else fitted} {replacement}"

    anchor_word = re.escape(words.get(anchor, anchor))
    return re.sub(rf"\b(?:(an?) )?({anchor_word})\b", substitute, anchor_prompt, flags=re.IGNORECASE)


def templates_of(config: AblationConfig) -> tuple[str | None, ...]:
    """The target templates a step draws from: a named set, the one template, or (None,) to substitute."""
    return TARGET_TEMPLATE_SETS.get(config.target_template, (config.target_template,))


def check_anchor(config: AblationConfig, concepts: Sequence[str]) -> None:
    """One-line errors for an anchor that cannot be ablated towards."""
    if not config.anchor_prompts:
        raise ValueError("Concept Ablation maps the concept onto an anchor: set method.anchor=<a concept or superclass, "
                         "e.g. dog for cat> (its prompts are made from templates; method.anchor_prompts=[...] gives "
                         "your own)")
    template = config.target_template
    if template is None and not config.anchor:
        raise ValueError("method.anchor is empty: set method.anchor to the word the anchor prompts name")
    if template is not None and template not in TARGET_TEMPLATE_SETS and "{concept}" not in template:
        raise ValueError(f"method.target_template {template!r} does not name {{concept}}; use a format string "
                         f"with {{anchor_prompt}} and {{concept}} or one of: {', '.join(TARGET_TEMPLATE_SETS)}")
    same = [c for c in concepts if c.lower() == config.anchor.lower()]
    if same:
        raise ValueError(f"method.anchor '{config.anchor}' is the erased concept itself; set method.anchor to "
                         "another concept or a superclass of it")
    targets = {(p, target_prompt(p, config.anchor, c, config.words, t))
               for p in config.anchor_prompts for c in concepts for t in templates_of(config)}
    if all(anchor_prompt == target for anchor_prompt, target in targets):
        raise ValueError(f"every target prompt equals its anchor prompt (the anchor prompts never name "
                         f"'{config.words.get(config.anchor, config.anchor)}'), so the loss is 0; set method.anchor "
                         "(or method.words) to the word the anchor prompts use, or method.target_template")


class Anchors:
    """Anchor latents with their prompts, generated once by the base model and cached on disk."""

    def __init__(self, latents: torch.Tensor, prompts: list[str]):
        self.latents, self.prompts = latents, prompts

    @classmethod
    def load_or_generate(cls, module: EraserModule, config: AblationConfig, cache: Path) -> Anchors:
        """The cached latents if the cache was generated from the same prompts, negative prompts and
        sampler; else newly generated ones (a resumed run with other anchor settings regenerates)."""
        prompts = [config.anchor_prompts[i % len(config.anchor_prompts)] for i in range(config.num_anchor_images)]
        negatives = [", ".join(module.concepts)] * len(prompts) if config.anchor_negative_prompt else None
        sampler = Sampler(config.anchor_steps, config.anchor_guidance, config.anchor_eta)
        source = json.dumps({"prompts": prompts, "negative_prompts": negatives,
                             "steps": sampler.steps, "guidance": sampler.guidance, "eta": sampler.eta})
        if cache.exists():
            with safe_open(cache, framework="pt") as stored:
                cached_source = (stored.metadata() or {}).get(ANCHORS_SOURCE)
            if cached_source == source:
                return cls(load_file(cache)["latents"].to(module.device), prompts)
        images = module.generate(prompts, list(range(len(prompts))), sampler, original=True, negative_prompts=negatives)
        latents = module.encode_images(images)
        atomic_save_tensors({"latents": latents}, cache, metadata={ANCHORS_SOURCE: source})  # same file on every DDP rank
        return cls(latents, prompts)


def detach_first_token(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the same output, with position 0 (the start-of-text token) detached."""
    return torch.cat([output[:, :1].detach(), output[:, 1:]], dim=1)


@contextlib.contextmanager
def start_token_detached(unet: torch.nn.Module) -> Iterator[None]:
    """While active, every cross-attention key and value projection (``attn2.to_k``/``to_v``, LoRA
    wrappers included) passes no gradient through the start-of-text token's key and value (CLIP's
    start token: SD and SDXL UNets only)."""
    include, _ = layers.CROSS_ATTENTION_KV.unet
    handles = [m.register_forward_hook(detach_first_token) for name, m in unet.named_modules() if re.search(include, name)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def ablation_loss(module: EraserModule, config: AblationConfig, anchors: Anchors) -> torch.Tensor:
    """One Concept Ablation step's loss for ``module``."""
    generator = module.step_generator()

    def trained_prediction(x_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        with start_token_detached(module.denoiser) if config.detach_start_token else contextlib.nullcontext():
            return module.predict(x_t, t, embeds)

    picks = torch.randint(len(anchors.prompts), (config.batch_size,), generator=generator).tolist()
    concepts = torch.randint(len(module.concepts), (config.batch_size,), generator=generator).tolist()
    anchor_prompts = [anchors.prompts[i] for i in picks]
    templates = templates_of(config)
    chosen = (torch.randint(len(templates), (config.batch_size,), generator=generator).tolist()
              if len(templates) > 1 else [0] * config.batch_size)
    target_prompts = [target_prompt(p, config.anchor, module.concepts[c], config.words, templates[k])
                      for p, c, k in zip(anchor_prompts, concepts, chosen)]
    latents = anchors.latents[picks]
    x_t, noise, t = module.add_noise(latents, generator)
    anchor_embeds, target_embeds = module.encode(anchor_prompts), module.encode(target_prompts)
    if config.variant == "noise":
        target = module.noise_target(latents, noise, t)
    elif config.anchor_model == "frozen":
        target = module.predict_frozen(x_t, t, anchor_embeds)
    else:
        with torch.no_grad():
            target = module.predict(x_t, t, anchor_embeds)
    loss = module.loss(trained_prediction(x_t, t, target_embeds), target)
    if config.prior_weight:  # the separate anchor half-batch, drawn after the ablation half-batch
        prior_picks = torch.randint(len(anchors.prompts), (config.batch_size,), generator=generator).tolist()
        prior_latents = anchors.latents[prior_picks]
        prior_x_t, prior_noise, prior_t = module.add_noise(prior_latents, generator)
        prior_embeds = module.encode([anchors.prompts[i] for i in prior_picks])
        prior = module.loss(trained_prediction(prior_x_t, prior_t, prior_embeds),
                            module.noise_target(prior_latents, prior_noise, prior_t))
        loss = loss + config.prior_weight * prior
    return loss


def ablation_optimizer(module: EraserModule, config: AblationConfig) -> torch.optim.Optimizer:
    """AdamW (weight decay ``weight_decay``) or Adam over the trained tensors, at ``lr`` or, with
    ``scale_lr``, at lr x batch_size (x2 with the prior half-batch) x the number of devices."""
    lr = config.lr
    if config.scale_lr:
        world_size = module._trainer.world_size if module._trainer is not None else 1
        lr *= config.batch_size * (2 if config.prior_weight else 1) * world_size
    parameters = list(module.trained.values())
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay)


class Ablation(EraserModule):
    name = "ablation"
    Config = AblationConfig
    choices = {"loss": tuple(LOSSES), "parameters": tuple(PARAMETER_GROUPS), **ABLATION_CHOICES, **ADAPTER_CHOICES}
    needs = {"anchor": "anchor", "anchor_prompts": "anchor_prompts", "words": "concept_words",
             "anchor_negative_prompt": "anchor_negative_prompt", "target_template": "anchor_target_template"}
    # the authors' nudity command (nupurkmr9/concept-ablation diffusers/README.md): every attention projection,
    # prior preservation (weight 1), lr 4e-6 (scaled by the preset's scale_lr), 400 steps
    by_concept_kind = {"nudity": {"method": {"parameters": "attn", "prior_weight": 1.0, "lr": 4e-6},
                                  "trainer": {"max_steps": 400}}}

    @classmethod
    def check(cls, config: AblationConfig, concepts: Sequence[str]) -> None:
        check_anchor(config, concepts)

    def trained_layers(self) -> layers.Region:
        return PARAMETER_GROUPS[self.config.parameters]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return ablation_optimizer(self, self.config)

    def gradient_clip_val(self) -> float | None:
        return self.config.max_grad_norm

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.anchors = Anchors.load_or_generate(self, self.config, Path(self.trainer.default_root_dir) / ANCHORS_FILE)

    def objective(self) -> torch.Tensor:
        return ablation_loss(self, self.config, self.anchors)

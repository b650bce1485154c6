"""MACE (Lu et al., CVPR 2024, "MACE: Mass Concept Erasure in Diffusion Models"): a closed-form refinement of the
cross-attention keys and values, one rank-1 LoRA per concept that takes the concept's attention off the object,
and a closed-form fusion of the LoRAs. Followed: Shilin-LU/MACE (commit 057e7a6) ``training.py``,
``src/cfr_utils.py``, ``src/cfr_lora_training.py``, ``src/dataset.py``, ``src/fuse_lora_close_form.py`` and
``configs/``.

Every projection W of ``attn2.to_k`` and ``attn2.to_v`` (originally W_o) goes through three stages. Keys e are
the frozen text encoder's states; each erased concept c_i has prompts p = t(c_i) from templates t and mapping
prompts t(m_i) (m_i its guide); K_p = sum e e^T over every token of the preservation prompts (the authors'
cached COCO captions, ``prior``, plus ``preserve_weight`` times the domain prompts, ``preserve``).

1. Closed-form refinement (CFR). Pair the tokens of t(c_i) and t(m_i): their common prefix, their common
   suffix and the padding after both (the concept's own tokens excluded), giving keys e_o and mapped keys e_n:

       W_1 = (lambda W_o + sum W_o e_n e_o^T + s_1 W_o K_p)(lambda I + sum e_o e_o^T + s_1 K_p)^-1,
       s_1 = train_preserve_scale^2              (the authors' code scales the preservation caches twice)

2. One LoRA per concept, W_1 + B_i A_i (rank 1, A_i ~ N(0, 1/r^2), B_i = 0; AdamW, constant lr, gradients
   clipped to 1), trained alone on 8 images x_0 of c_i with their object masks M, a prompt t(c_i) per step:

       L_i = sum_layers || A_l[:, M_l, S] ||_F,     x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps,
       p(t) ~ sigmoid(0.05 (t - 200)) - sigmoid(0.05 (t - 400))

   A_l the softmax attention (heads, pixels, tokens) of every cross-attention layer, M_l the mask resized to
   the layer (nearest, > 0.5), S the concept's token positions and every end-of-text token (SD-1.x pads with
   it: the end and all padding). No denoising term. Styles have no masks (every pixel).

3. Fusion, with W_i = W_1 + B_i A_i and E_i = sum e e^T over every token of c_i's prompts:

       W* = (lambda W_1 + sum_i W_i E_i + s_f W_o K_p)(lambda I + sum_i E_i + s_f K_p)^-1,  s_f = fuse_preserve_scale

Defaults, the authors' mass-erasure configs (celebrities 1-100, ``configs/celebrity``): lr 1e-4, 50 steps per
concept, lambda 0, both preserve scales 1e-4, preserve weight 8e3 / 5e4 / 8e4 / 2e5 for 1 / 5 / 10 / 100
concepts (larger N takes the next config's), 30 templates, rank 1, 8 images, the timestep sampling on. Objects
(``configs/object``): lr 1e-5, lambda 1e2 (their ship, bird and automobile use 1e3, 1e1, 1e2), no
preservation. Artists (``configs/art``): preserve weight 8e4, the style templates, no masks. Explicit content:
lr 1e-5, 120 steps, scales 7e-7. ``trainer.max_steps`` is the whole budget, split evenly over the concepts. The
module's weights hold W_1 until the fusion at the end of training (an evaluation during training sees W_1).

Images and masks: the authors generate 8 images per concept with the original model and segment them with
Grounded-SAM. ``method.data`` names them (:mod:`erasure.examples`): on the toy world ``renderer``, its scenes of the
concept and their exact object masks; on real models a folder of ``<concept>/`` images and ``<concept> mask/``
masks, the layout of the authors' ``data_preparation.py``. Differences from their code: the
images enter the VAE in [-1, 1] (theirs are normalised with ImageNet's mean and deviation, a slip) and are
resized to the model's resolution (theirs: random crops of 512-pixel images); the solves are float64 (theirs
float32 ``torch.inverse``); the toy world's templates are its own four phrasings (its vocabulary has none of
theirs). Runs on SD-1.x/2.x, as their code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from erasure import layers
from erasure.examples import concept_examples
from erasure.methods.base import EraserModule, MethodConfig

# the authors' prompt augmentation (src/cfr_utils.py prompt_augmentation), the 30 their configs sample
OBJECT_TEMPLATES = (
    "{} in a photo", "{} in a snapshot", "A snapshot of {}", "A photograph showcasing {}", "An illustration of {}",
    "A digital rendering of {}", "A visual representation of {}", "A graphic of {}", "A shot of {}",
    "A photo of {}", "A black and white image of {}", "A depiction in portrait form of {}",
    "A scene depicting {} during a public gathering", "{} captured in an image",
    "A depiction created with oil paints capturing {}", "An image of {}", "A drawing capturing the essence of {}",
    "An official photograph featuring {}", "A detailed sketch of {}", "{} during sunset/sunrise",
    "{} in a detailed portrait", "An official photo of {}", "Historic photo of {}", "Detailed portrait of {}",
    "A painting of {}", "HD picture of {}", "Magazine cover capturing {}", "Painting-like image of {}",
    "Hand-drawn art of {}", "An oil portrait of {}")
STYLE_TEMPLATES = (
    "An artwork by {}", "Art piece by {}", "A recent creation by {}", "{}'s renowned art", "Latest masterpiece by {}",
    "A stunning image by {}", "An art in {}'s style", "Exhibition artwork of {}", "Art display by {}",
    "a beautiful painting by {}", "An image inspired by {}'s style", "A sketch by {}", "Art piece representing {}",
    "A drawing by {}", "Artistry showcasing {}", "An illustration by {}", "A digital art by {}",
    "A visual art by {}", "A reproduction inspired by {}'s colorful, expressive style", "Famous painting of {}",
    "A famous art by {}", "Artistic style of {}", "{}'s famous piece", "Abstract work of {}",
    "{}'s famous drawing", "Art from {}'s early period", "A portrait by {}",
    "An imitation reflecting the style of {}", "An painting from {}'s collection",
    "Vibrant reproduction of artwork by {}")
STEPS_PER_CONCEPT = 50  # the authors' max_train_steps (celebrities, artists, objects)
# preserve_weight of the authors' celebrity configs by the number of concepts erased (1, 5, 10, 100)
PRESERVE_WEIGHTS = ((1, 8e3), (5, 5e4), (10, 8e4), (100, 2e5))


@dataclass
class MACEConfig(MethodConfig):
    name: str = "mace"
    lr: float = 1e-4
    guide: list[str] = field(default_factory=lambda: ["a person"])  # the mapping concept: one, or one per concept
    prompt_template: str = "{concept}"  # how a template's {} names the concept
    words: dict[str, str] = field(default_factory=dict)  # how the prompts spell a concept where not by its name
    templates: list[str] = field(default_factory=lambda: list(OBJECT_TEMPLATES))
    preserve: list[str] = field(default_factory=list)  # domain prompts kept (the authors' celebrity/art caches)
    prior: list[str] = field(default_factory=list)  # general prompts kept (the authors' COCO captions)
    preserve_weight: float = 8e4
    lamb: float = 0.0  # lambda
    train_preserve_scale: float = 1e-4
    fuse_preserve_scale: float = 1e-4
    rank: int = 1
    images: int = 8  # images per concept
    masks: bool = True  # the attention loss on the object's pixels only (the authors' use_gsam_mask)
    importance_sampling: bool = True
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    data: str | None = None  # a folder of <concept>/ images and "<concept> mask"/ masks, or a source (erasure.examples)


def paired_positions(old: Sequence[int], new: Sequence[int], length: int) -> tuple[list[int], list[int]]:
    """MACE's token pairing of two unpadded token lists: their common prefix and common suffix (what differs, the
    concept and its mapping, left out), then the ``length`` - 1 - last padding positions after each."""
    prefix = 0
    while prefix < min(len(old), len(new)) and old[prefix] == new[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(old), len(new)) - prefix and old[-1 - suffix] == new[-1 - suffix]:
        suffix += 1
    old_positions = list(range(prefix)) + list(range(len(old) - suffix, len(old)))
    new_positions = list(range(prefix)) + list(range(len(new) - suffix, len(new)))
    padding = length - 1 - max(old_positions[-1], new_positions[-1])
    return (old_positions + list(range(old_positions[-1] + 1, old_positions[-1] + 1 + padding)),
            new_positions + list(range(new_positions[-1] + 1, new_positions[-1] + 1 + padding)))


def timestep_weights(count: int) -> torch.Tensor:
    """MACE's timestep sampling, p(t) ~ sigmoid(0.05 (t - 200)) - sigmoid(0.05 (t - 400)) over t = 0..count-1."""
    t = torch.arange(count, dtype=torch.float64)
    weights = torch.sigmoid(0.05 * (t - 200)) - torch.sigmoid(0.05 * (t - 400))
    return weights / weights.sum()


def closed_form(numerator: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """numerator keys^-1 for symmetric ``keys`` (float64)."""
    return torch.linalg.solve(keys, numerator.T).T


def preserve_weight_for(count: int) -> float:
    """The authors' celebrity configs' preserve weight for ``count`` concepts (the next config's above 10)."""
    return next((weight for most, weight in PRESERVE_WEIGHTS if count <= most), PRESERVE_WEIGHTS[-1][1])


class AttentionSuppression:
    """Context manager: every ``attn2`` of a UNet computes its softmax explicitly and adds
    || A[:, pixels in the mask, positions] ||_F to :attr:`loss` (MACE's ``AttnController``)."""

    def __init__(self, unet: torch.nn.Module, positions: torch.Tensor, mask: torch.Tensor | None):
        self.unet, self.positions, self.mask = unet, positions, mask
        self.loss = 0.0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attn.norm_cross or attn.group_norm is not None or attn.spatial_norm is not None or hidden_states.ndim != 3:
            raise ValueError("MACE's attention loss reads SD's plain cross-attention; this model's attn2 differs")
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (heads, pixels, tokens), batch 1
        selected = probs[..., self.positions]
        if self.mask is not None:
            side = math.isqrt(probs.shape[1])
            pixels = F.interpolate(self.mask, size=(side, side), mode="nearest").flatten() > 0.5
            selected = selected[:, pixels]
        self.loss = self.loss + selected.norm()
        hidden = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        if attn.residual_connection:
            hidden = hidden + hidden_states
        return hidden / attn.rescale_output_factor

    def __enter__(self) -> AttentionSuppression:
        self.saved = dict(self.unet.attn_processors)
        self.unet.set_attn_processor({name: self if ".attn2." in name else processor
                                      for name, processor in self.saved.items()})
        return self

    def __exit__(self, *exc) -> None:
        self.unet.set_attn_processor(self.saved)


class ConceptLoRA(torch.nn.Module):
    """One concept's rank-r factors on every edited projection: W + B A (diffusers' LoRALinearLayer, scale 1)."""

    def __init__(self, weights: dict[str, torch.Tensor], rank: int, generator: torch.Generator):
        super().__init__()
        self.down = torch.nn.ParameterDict({key(n): torch.randn(rank, w.shape[1], generator=generator) / rank
                                            for n, w in weights.items()})
        self.up = torch.nn.ParameterDict({key(n): torch.zeros(w.shape[0], rank) for n, w in weights.items()})

    def delta(self, name: str) -> torch.Tensor:
        return self.up[key(name)] @ self.down[key(name)]


def key(name: str) -> str:
    return name.replace(".", "-")  # a ParameterDict key has no dots


class MACE(EraserModule):
    name = "mace"
    Config = MACEConfig
    families = ("sd",)  # their code: SD-1.4 (and SD-2.1-base in a comment); nothing for SDXL or FLUX
    needs = {"prompt_template": "concept_prompt", "words": "concept_words", "guide": "guide", "preserve": "preserve"}
    by_concept_kind = {
        "object": {"method": {"lr": 1e-5, "lamb": 1e2, "train_preserve_scale": 0.0, "fuse_preserve_scale": 0.0,
                              "preserve_weight": 0.0}},
        "style": {"method": {"guide": ["art"], "templates": list(STYLE_TEMPLATES), "masks": False,
                             "preserve_weight": 8e4}},
        "nudity": {"method": {"guide": ["a person wearing clothes"], "lr": 1e-5, "train_preserve_scale": 7e-7,
                              "fuse_preserve_scale": 7e-7, "preserve_weight": 0.0}}}

    @classmethod
    def kind_defaults(cls, kind: str | None, concepts: Sequence[str]) -> dict[str, Any]:
        """The authors' config for ``kind`` (celebrities' when none), and their steps per concept as the budget."""
        steps = 120 if kind == "nudity" else STEPS_PER_CONCEPT
        method = (cls.by_concept_kind[kind]["method"] if kind in cls.by_concept_kind
                  else {"preserve_weight": preserve_weight_for(len(concepts))})
        return {"method": method, "trainer": {"max_steps": steps * max(len(concepts), 1)}}

    @classmethod
    def check(cls, config: MACEConfig, concepts: Sequence[str]) -> None:
        if len(config.guide) not in (1, len(concepts)):
            raise ValueError(f"method.guide has {len(config.guide)} entries for {len(concepts)} concepts; "
                             "give one mapping concept for all or one per erased concept")
        if not config.templates or any("{}" not in t for t in config.templates):
            raise ValueError("method.templates must be prompts with {} where the concept goes, e.g. 'A photo of {}'")
        if config.data is None:
            raise ValueError("MACE trains on images of each concept with its object masks: give method.data=<folder> "
                             "holding <concept>/ images and '<concept> mask'/ masks (their data_preparation.py "
                             "with Grounded-SAM writes it), or method.data=renderer on the toy world")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for parameter in self.trained.values():
            parameter.requires_grad_(False)  # written by the closed forms; the LoRAs are what trains
        generator = torch.Generator().manual_seed(self.seed)
        weights = {name: p for name, p in self.trained.items() if name.endswith(".weight")}
        self.width = next(iter(weights.values())).shape[1]  # the text states' width
        self.loras = torch.nn.ModuleList(ConceptLoRA(weights, self.config.rank, generator) for _ in self.concepts)

    def trained_layers(self) -> layers.Region:
        return layers.CROSS_ATTENTION_KV

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One AdamW over every concept's factors: a concept's get gradients, and Adam state, only in its steps."""
        return torch.optim.AdamW(self.loras.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    def gradient_clip_val(self) -> float | None:
        return self.config.max_grad_norm

    # ----- prompts and keys ------------------------------------------------------------------
    def phrase(self, concept: str) -> str:
        return self.config.prompt_template.format(concept=self.config.words.get(concept, concept))

    def prompt_pairs(self) -> list[tuple[list[str], list[str]]]:
        """Per concept, its prompts t(c) and the mapping prompts t(m), template by template."""
        guides = self.config.guide * (len(self.concepts) if len(self.config.guide) == 1 else 1)
        return [([t.format(self.phrase(c)) for t in self.config.templates], [t.format(g) for t in self.config.templates])
                for c, g in zip(self.concepts, guides)]

    @torch.no_grad()
    def states(self, prompts: Sequence[str]) -> torch.Tensor:
        """The frozen text encoder's states of every token (prompts, length, d), float64."""
        return self.encode_frozen(prompts).embeds.double()

    def covariance(self, prompts: Sequence[str]) -> torch.Tensor:
        """sum e e^T over every token of ``prompts`` (the authors' caches)."""
        if not prompts:
            return torch.zeros(self.width, self.width, dtype=torch.float64, device=self.device)
        keys = self.states(prompts).flatten(0, 1)
        return keys.T @ keys

    @cached_property
    def preservation(self) -> torch.Tensor:
        """K_p = sum over the prior prompts + preserve_weight x sum over the domain prompts (kept concepts, phrased
        by each template); computed once, for the refinement and the fusion."""
        kept = [t.format(self.phrase(c)) for c in self.config.preserve if c not in self.concepts
                for t in self.config.templates]
        return self.covariance(self.config.prior) + self.config.preserve_weight * self.covariance(kept)

    def refinement_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """CFR's sums over the paired tokens: (sum e_n e_o^T, sum e_o e_o^T)."""
        tokenizer = self.pipeline.tokenizer
        mixed, keys = 0.0, 0.0
        for old, new in self.pairs:
            old_states, new_states = self.states(old), self.states(new)
            length = old_states.shape[1]
            for i, (o, n) in enumerate(zip(tokenizer(old).input_ids, tokenizer(new).input_ids)):
                old_positions, new_positions = paired_positions(o[:length], n[:length], length)
                e_o, e_n = old_states[i, old_positions], new_states[i, new_positions]
                mixed, keys = mixed + e_n.T @ e_o, keys + e_o.T @ e_o
        return mixed, keys

    # ----- stage 1 ---------------------------------------------------------------------------
    @torch.no_grad()
    def refine(self) -> None:
        """CFR: W_1 = W_o T written into every edited projection, T shared by all of them."""
        self.pairs = self.prompt_pairs()
        mixed, keys = self.refinement_keys()
        identity = torch.eye(keys.shape[0], dtype=torch.float64, device=self.device)
        scaled = self.config.train_preserve_scale ** 2 * self.preservation
        transform = closed_form(self.config.lamb * identity + mixed + scaled, self.config.lamb * identity + keys + scaled)
        for name, weight in self.trained.items():
            original = self.original[name]
            weight.copy_((original.double() @ transform).to(weight.dtype) if name.endswith(".weight") else original)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.refine()
        self.prepare_examples()

    # ----- stage 2 ---------------------------------------------------------------------------
    def prepare_examples(self, count: int | None = None) -> None:
        """The images, masks and token positions of the first ``count`` concepts (default all) for stage 2."""
        concepts = self.concepts[:count]
        self.examples = [self.concept_examples(c) for c in concepts]
        self.token_positions = [self.positions(c, old) for c, (old, _) in zip(concepts, self.pairs)]
        self.timestep_weights = timestep_weights(self.family.num_train_timesteps)

    def concept_examples(self, concept: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(posterior means, posterior deviations, masks (n, 1, H, W) or None) of the concept's images."""
        images, masks = concept_examples(self.config.data, concept, self.config.images,
                                         self.latent_size * self.pipeline.vae_scale_factor, self.seed, self.config.masks)
        pixels = torch.as_tensor(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(self.device, self.vae.dtype)
        with torch.no_grad():
            posterior = self.vae.encode(pixels).latent_dist
        return posterior.mean, posterior.std, None if masks is None else torch.as_tensor(masks)[:, None].to(self.device)

    def positions(self, concept: str, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Per prompt, S as a boolean over the tokens: the concept's word tokens and every end-of-text token."""
        tokenizer = self.pipeline.tokenizer
        word = tokenizer(self.config.words.get(concept, concept), add_special_tokens=False).input_ids
        found = []
        for ids in tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                             truncation=True).input_ids:
            selected = torch.tensor([token == tokenizer.eos_token_id for token in ids])
            for start in range(len(ids) - len(word) + 1):
                if ids[start:start + len(word)] == word:
                    selected[start:start + len(word)] = True
            found.append(selected.to(self.device))
        return found

    def concept_at(self, step: int) -> int:
        """The concept trained at ``step``: the budget split evenly, in order."""
        return step * len(self.concepts) // self.trainer.max_steps

    def objective(self) -> torch.Tensor:
        """L_i on one image and one prompt of the current concept i, through W_1 + B_i A_i."""
        generator = self.step_generator()
        index = self.concept_at(self.global_step)
        means, deviations, masks = self.examples[index]
        image = int(torch.randint(len(means), (1,), generator=generator))
        prompt = int(torch.randint(len(self.config.templates), (1,), generator=generator))
        noise_shape = means[image:image + 1].shape
        latents = self.family.latents_from_vae(
            means[image:image + 1] + deviations[image:image + 1] * torch.randn(noise_shape, generator=generator).to(means))
        t = (torch.multinomial(self.timestep_weights, 1, generator=generator) if self.config.importance_sampling
             else self.family.draw_timesteps(1, generator))
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        x_t = self.family.add_noise(latents, noise, t)
        condition = self.encode([self.pairs[index][0][prompt]])
        lora = self.loras[index]
        weights = {name: self.trained[name] + lora.delta(name) for name in self.trained if name.endswith(".weight")}
        mask = masks[image:image + 1] if masks is not None else None
        with AttentionSuppression(self.denoiser, self.token_positions[index][prompt], mask) as attention:
            functional_call(self.denoiser, weights, (), self.family.inputs(x_t, t.to(self.device), condition))
        return attention.loss

    # ----- stage 3 ---------------------------------------------------------------------------
    @torch.no_grad()
    def fuse(self) -> None:
        """W* = (lambda W_1 + sum_i (W_1 + B_i A_i) E_i + s_f W_o K_p)(lambda I + sum_i E_i + s_f K_p)^-1."""
        covariances = [self.covariance(old) for old, _ in self.pairs]
        preservation = self.config.fuse_preserve_scale * self.preservation
        total = sum(covariances)
        identity = torch.eye(total.shape[0], dtype=torch.float64, device=self.device)
        keys = self.config.lamb * identity + total + preservation
        for name, weight in self.trained.items():
            if not name.endswith(".weight"):
                continue
            refined = weight.double()
            numerator = self.config.lamb * refined + refined @ total + self.original[name].double() @ preservation
            for lora, covariance in zip(self.loras, covariances):
                numerator = numerator + lora.delta(name).double() @ covariance
            weight.copy_(closed_form(numerator, keys).to(weight.dtype))

    def on_train_end(self) -> None:
        """The fusion, after the last concept's LoRA (before the evaluation, which runs at fit end)."""
        self.fuse()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The trained tensors (the refined projections) and every concept's factors."""
        loras = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("loras.")}
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] |= loras


"""AdvUnlearn (Zhang et al., "Defensive Unlearning with Adversarial Training for Robust Concept
Erasure in Diffusion Models", NeurIPS 2024).

ESD's unlearning objective, trained against an adversary that searches for a prompt bringing the
concept back, plus a utility term on prompts to keep. With the frozen model eps*, the trained model
eps_theta, the concept prompt c, the negative guidance eta, a set C(c) of adversarial prompts and a
retain set R of prompts, each step solves

    c_adv = argmin_{c' in C(c)}  || eps_theta(x_t, c', t) - eps*(x_t, c, t) ||^2               (attack)

    min_theta  L(eps_theta(x_t, c_adv, t), eps*(x_t, t) - eta (eps*(x_t, c, t) - eps*(x_t, t)))
               + lambda * E_{c_r ~ R} L(eps_theta(x_t^r, c_r, t), eps*(x_t^r, c_r, t))             (unlearning)

(``L`` = ``method.loss``, mse by default; the attack's loss is the MSE, as in the reference code).
The unlearning term is ESD's (:func:`erasure.methods.esd.esd_target`, eta in the ESD paper's
convention); lambda is ``retain_loss_w``.

C(c) (``attack_type``): c with ``adv_prompt_num`` = k free token embeddings inserted after the
start token (``prefix_k``, the reference default) or after the prompt's last token (``suffix_k``);
the last k positions (padding) drop out so the sequence keeps its length. The attack runs
``attack_step`` Adam steps (lr ``attack_lr``) on the k embeddings, on the gradient (``pgd``) or
on its sign (``fast_at``, the paper's Fast-AT variant), each on a fresh x_t; every attack starts
from k rows of the token table drawn anew (``attack_init=random``, the README commands') or from the
previous attack's embeddings (``latest``, the argument default; the first attack draws). It runs
every ``adv_prompt_update_step`` steps once ``warmup_iter`` steps of plain unlearning (the trained
prediction on c itself) have passed.

x_t comes from partial DDIM sampling (``ddim_steps`` 50, guidance ``sample_guidance`` 3) stopped
after a number of steps drawn as the reference draws them, which copies the CompVis ESD loop (as
ESD's paper loop here): k ~ U{0..S-1}, min(S, S + 1 - k) steps (:func:`erasure.methods.esd.compvis_steps`:
where that sampler stops, two DDIM steps past k's window), t drawn in DDIM step k's window
(:func:`erasure.methods.esd.ddpm_window`). As in the reference code the
sampler is the current UNet with the original text encoder's conditioning: the frozen model when
the text encoder trains, the current one when the UNet does. x_t^r is sampled from the retain
prompts at the same step. Each step takes the next ``retain_batch`` prompts of a shuffled pass over
R, as the reference's prompt dataset hands out unseen prompts until fewer than a batch are left and
then starts again (a new shuffle per pass, a function of the seed and the pass, so resumed runs
repeat it). R is ``retain`` (concepts written with ``prompt_template``; the erased concepts are
dropped): on the toy world the protocol gives every other toy concept. Otherwise R is read from
``retain_csv``, a CSV with a ``prompt`` column: the reference's retain set is its
data/prompts/train/coco_object_retain.csv (the README commands' ``--dataset_retain coco_object``:
243 prompts "a photo of {object}"), which the project does not redistribute; pass that file, and a
prompt "a photo of {c}" of an erased concept c is dropped as the authors' set never retains it.

What is trained (``train_method``): ``text_encoder_full`` (the paper's finding and the reference
default) every text-encoder parameter but the token and position embeddings (the transformer layers
and the final layer norm); ``xattn`` the UNet's cross-attention projections (ESD-x).

Reference defaults (OPTML-Group/AdvUnlearn at 9d23124, train-scripts/AdvUnlearn.py arguments; the
README commands, which the authors ran, where they differ): lr 1e-5, 1000 iterations,
text_encoder_full, start_guidance 3, negative_guidance 1, ddim_steps 50, attack_type prefix_k,
adv_prompt_num 1, attack_step 30, attack_lr 1e-3, attack_method pgd, attack_init random (README;
argument default latest), adv_prompt_update_step 1, warmup_iter 200, retain_batch 5, retain_train reg
with retain_loss_w 0.3 and dataset_retain coco_object (README; argument defaults iter, 1.0 and coco,
which its loader rejects). Not offered here: the iterative retain variant, condition-embedding
attacks, the other insertion types and the per-layer text-encoder subsets.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from erasure import layers
from erasure.losses import LOSSES
from erasure.adapters import ADAPTER_CHOICES, AdapterOptions
from erasure.methods.base import EraserModule, MethodConfig
from erasure.methods.esd import (
    RetainOptions, check_retain, compvis_xt, ddpm_window, esd_target, retain_loss, retain_prompts,
)
from erasure.weights import TEXT_ENCODER_PREFIX

TRAIN_METHODS = ("text_encoder_full", "xattn")
RETAIN_STREAM = 2**40  # the retain passes' shuffles draw from seeds apart from the steps'


@functools.cache
def csv_prompts(path: str) -> tuple[str, ...]:
    """The ``prompt`` column of the CSV at ``path``, in order; a missing file or column is a one-line ValueError."""
    try:
        with Path(path).open(newline="") as file:
            rows = list(csv.DictReader(file))
    except OSError:
        raise ValueError(f"method.retain_csv: cannot read {path}; pass a CSV with a prompt column "
                         "(the authors' is AdvUnlearn's data/prompts/train/coco_object_retain.csv)") from None
    if not rows or "prompt" not in rows[0]:
        raise ValueError(f"method.retain_csv: {path} has no prompt column (or no rows); its header must name 'prompt'")
    return tuple(row["prompt"] for row in rows)


def retain_set(config: AdvUnlearnConfig, concepts: Sequence[str]) -> list[str]:
    """R: ``retain`` written with the template (:func:`erasure.methods.esd.retain_prompts`); with no
    ``retain``, the prompts of ``retain_csv`` but "a photo of {c}" of an erased c (and "" with ``retain_empty``)."""
    if config.retain:
        return retain_prompts(config, concepts)
    kept = [p for p in csv_prompts(config.retain_csv) if p.removeprefix("a photo of ") not in concepts]
    return kept + [""] if config.retain_empty else kept


def retain_batch_at(prompts: Sequence[str], batch: int, step: int, shuffle_seed: int) -> list[str]:
    """The prompts of ``step``: passes of ``len(prompts) // batch`` steps, each over a new shuffle
    (seeded by ``shuffle_seed`` + the pass), handing out ``batch`` unseen prompts per step; the few
    left over at the end of a pass are skipped, as in the reference (all prompts when fewer than a batch)."""
    batch = min(batch, len(prompts))
    steps_per_pass = len(prompts) // batch
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(shuffle_seed + step // steps_per_pass))
    start = (step % steps_per_pass) * batch
    return [prompts[int(i)] for i in order[start:start + batch]]


@dataclass
class AdvUnlearnConfig(AdapterOptions, RetainOptions, MethodConfig):
    name: str = "advunlearn"
    train_method: str = "text_encoder_full"  # text_encoder_full (reference) | xattn (UNet attn2, ESD-x)
    lr: float = 1e-5  # reference
    batch_size: int = 1  # concept samples per step (reference 1)
    eta: float = 1.0  # negative guidance (reference negative_guidance 1)
    ddim_steps: int = 50  # reference
    sample_guidance: float = 3.0  # reference start_guidance 3
    retain_batch: int = 5  # retain prompts per step (reference 5)
    retain_loss_w: float = 0.3  # lambda (reference README commands 0.3; argument default 1.0)
    retain_csv: str | None = None  # R without method.retain: a CSV's prompt column (the authors' coco_object_retain.csv)
    warmup_iter: int = 200  # steps without attack (reference 200)
    adv_prompt_update_step: int = 1  # attack every n steps (reference 1)
    attack_type: str = "prefix_k"  # prefix_k (reference) | suffix_k
    adv_prompt_num: int = 1  # k adversarial token embeddings (reference 1)
    attack_step: int = 30  # Adam steps per attack (reference 30)
    attack_lr: float = 1e-3  # reference
    attack_method: str = "pgd"  # pgd: Adam on the gradient (reference) | fast_at: Adam on its sign
    attack_init: str = "random"  # random: new token rows each attack (README) | latest: the previous attack's result


class AdvUnlearn(EraserModule):
    name = "advunlearn"
    Config = AdvUnlearnConfig
    families = ("sd",)  # its adversarial prompts are token embeddings of the one CLIP encoder SD-1.x/2.x reads
    choices = {"loss": tuple(LOSSES), "train_method": TRAIN_METHODS, "attack_type": ("prefix_k", "suffix_k"),
               "attack_method": ("pgd", "fast_at"), "attack_init": ("latest", "random"), **ADAPTER_CHOICES}
    needs = {"prompt_template": "concept_prompt", "retain": "retain"}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.adversarial_tokens: torch.Tensor | None = None  # (k, width): the latest attack's embeddings

    @classmethod
    def check(cls, config: AdvUnlearnConfig, concepts: Sequence[str]) -> None:
        if config.adapter == "lora" and config.train_method != "xattn":
            raise ValueError("method.adapter=lora wraps UNet projections: use method.train_method=xattn with it "
                             "(the text encoder is trained as its own tensors)")
        if config.attack_lr <= 0:
            raise ValueError(f"method.attack_lr must be positive, got {config.attack_lr}")
        for key in ("adv_prompt_num", "attack_step", "adv_prompt_update_step"):
            if getattr(config, key) < 1:
                raise ValueError(f"method.{key} must be at least 1, got {getattr(config, key)}")
        if not (config.retain or config.retain_csv or config.retain_empty) and config.retain_loss_w > 0:
            raise ValueError("AdvUnlearn's retain term has no prompts to keep here; pass method.retain_csv=<a CSV with a "
                             "prompt column: the authors' set is AdvUnlearn's data/prompts/train/coco_object_retain.csv>, "
                             "method.retain=[a,b] or method.retain_loss_w=0")
        if config.retain or not config.retain_csv:
            check_retain(config, concepts)
        elif config.retain_loss_w > 0 and not retain_set(config, concepts):
            raise ValueError(f"method.retain_csv: {config.retain_csv} leaves nothing to retain")

    # ----- what is trained ---------------------------------------------------------------
    def trained_layers(self) -> layers.Region | None:
        return layers.CROSS_ATTENTION if self.config.train_method == "xattn" else None

    def select_trainable(self) -> dict[str, torch.nn.Parameter]:
        if self.config.train_method == "xattn":
            return super().select_trainable()
        return {f"{TEXT_ENCODER_PREFIX}{name}": parameter for name, parameter in self.text_encoder.named_parameters()
                if "embeddings" not in name.split(".")}

    # ----- prompts ------------------------------------------------------------------------
    def random_tokens(self, generator: torch.Generator) -> torch.Tensor:
        """k rows of the token table drawn uniformly (the attack's random start)."""
        table = self.text_encoder.get_input_embeddings().weight
        ids = torch.randint(len(table), (self.config.adv_prompt_num,), generator=generator)
        return table[ids.to(table.device)].detach().clone()

    def adversarial_encoding(self, prompt: str, tokens: torch.Tensor, batch: int) -> torch.Tensor:
        """The current text encoder's hidden states (batch, L, width) of ``prompt`` with the token
        embeddings ``tokens`` (k, width) inserted (``attack_type``); the last k positions drop out."""
        tokenizer = self.pipeline.tokenizer
        length, k = tokenizer.model_max_length, len(tokens)
        ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids.to(self.device)
        end = len(tokenizer(prompt, truncation=True, max_length=length).input_ids) - 1  # the end-of-text token
        at = min(1 if self.config.attack_type == "prefix_k" else end, length - k)
        table = self.text_encoder.get_input_embeddings()
        words = table(ids)
        inserted = torch.cat([words[:, :at], tokens[None].to(words), words[:, at:length - k]], dim=1)
        # the ids only give the call its shape: the hook below supplies the token embeddings
        inserted_ids = torch.cat([ids[:, :at], ids[:, length - k:], ids[:, at:length - k]], dim=1)
        handle = table.register_forward_hook(lambda _module, _args, _output: inserted)
        try:
            hidden = self.text_encoder(inserted_ids)[0]
        finally:
            handle.remove()
        return hidden.expand(batch, -1, -1)

    # ----- the objective -------------------------------------------------------------------
    def draw_timestep(self, generator: torch.Generator) -> tuple[int, int]:
        """(k, the query timestep): the reference's (CompVis) draw of the DDIM step k and of t in k's window,
        one t for the batch, both before x_t is sampled."""
        steps = self.config.ddim_steps
        k = int(torch.randint(steps, (1,), generator=generator))
        low, high = ddpm_window(k, steps, self.family.num_train_timesteps)
        return k, int(torch.randint(low, high, (1,), generator=generator))

    def noisy_latents(self, embeds: torch.Tensor, k: int, timestep: int,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t): ESD's CompVis x_t for the draw k (:func:`erasure.methods.esd.compvis_xt`) with the
        conditioning ``embeds``, t = ``timestep``."""
        # the reference samples with the current UNet and the original text encoder's conditioning
        latents = compvis_xt(self, embeds, k, self.config.ddim_steps, self.config.sample_guidance, generator,
                             frozen=self.trains_text_encoder)
        return latents, torch.full((len(embeds),), timestep, device=self.device)

    def attack_loss(self, prompt: str, tokens: torch.Tensor, latents: torch.Tensor, t: torch.Tensor,
                    eps_concept: torch.Tensor) -> torch.Tensor:
        """|| eps_theta(x_t, c', t) - eps*(x_t, c, t) ||^2 for the adversarial prompt c' = (tokens, prompt)."""
        embeds = self.adversarial_encoding(prompt, tokens, len(latents))
        return torch.nn.functional.mse_loss(self.predict(latents, t, embeds), eps_concept)

    def attack(self, prompt: str, generator: torch.Generator) -> list[float]:
        """Search the adversarial token embeddings for ``prompt``; keeps them, returns the loss per step."""
        config = self.config
        start = self.adversarial_tokens
        if config.attack_init == "random" or start is None:
            start = self.random_tokens(generator)
        tokens = start.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([tokens], lr=config.attack_lr)
        concept_embeds = self.encode_frozen([prompt] * config.batch_size)
        losses = []
        for _ in range(config.attack_step):
            latents, t = self.noisy_latents(concept_embeds, *self.draw_timestep(generator), generator)
            eps_concept = self.predict_frozen(latents, t, concept_embeds)
            loss = self.attack_loss(prompt, tokens, latents, t, eps_concept)
            (gradient,) = torch.autograd.grad(loss, [tokens])  # the model's tensors get no gradient
            tokens.grad = gradient.sign() if config.attack_method == "fast_at" else gradient
            optimizer.step()
            losses.append(float(loss.detach()))
        self.adversarial_tokens = tokens.detach()
        return losses

    def objective(self) -> torch.Tensor:
        config = self.config
        generator = self.step_generator()
        concept = self.concepts[int(torch.randint(len(self.concepts), (1,), generator=generator))]
        prompt = config.prompt_template.format(concept=concept)
        attacking = self.global_step >= config.warmup_iter
        due = (self.global_step - config.warmup_iter) % config.adv_prompt_update_step == 0
        if attacking and (due or self.adversarial_tokens is None):
            self.log("train/attack_loss", self.attack(prompt, generator)[-1])

        concept_embeds = self.encode_frozen([prompt] * config.batch_size)
        null_embeds = self.encode_frozen([""] * config.batch_size)
        k, timestep = self.draw_timestep(generator)
        latents, t = self.noisy_latents(concept_embeds, k, timestep, generator)
        eps_concept = self.predict_frozen(latents, t, concept_embeds)
        target = esd_target(eps_concept, eps_concept, self.predict_frozen(latents, t, null_embeds), config.eta)
        trained_embeds = (self.adversarial_encoding(prompt, self.adversarial_tokens, config.batch_size) if attacking
                          else self.encode([prompt] * config.batch_size))
        unlearn = self.loss(self.predict(latents, t, trained_embeds), target)
        self.log("train/unlearn_loss", unlearn.detach())
        if config.retain_loss_w == 0:
            return unlearn
        prompts = self.retain_prompts_of_step()
        retain_latents, retain_t = self.noisy_latents(self.encode_frozen(prompts), k, timestep, generator)
        retain = retain_loss(self, prompts, retain_latents, retain_t)
        self.log("train/retain_loss", retain.detach())
        return unlearn + config.retain_loss_w * retain

    def retain_prompts_of_step(self) -> list[str]:
        """This step's ``retain_batch`` prompts of R (:func:`retain_batch_at`); under DDP each rank its own passes."""
        shuffle_seed = RETAIN_STREAM + (self.seed * 1_000 + self.global_rank) * 1_000_003
        return retain_batch_at(retain_set(self.config, self.concepts), self.config.retain_batch, self.global_step,
                               shuffle_seed)

    # The latest attack's embeddings start the next attack (attack_init=latest): resumed runs keep them.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.adversarial_tokens is not None:
            checkpoint["adversarial_tokens"] = self.adversarial_tokens.cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        tokens = checkpoint.get("adversarial_tokens")
        self.adversarial_tokens = tokens.to(self.device) if tokens is not None else None

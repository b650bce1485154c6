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
on its sign (``fast_at``, the paper's Fast-AT variant), each on a fresh x_t; it starts from the
previous attack's embeddings (``attack_init=latest``; the first attack, and ``random``, from k
random rows of the token table). It runs every ``adv_prompt_update_step`` steps once
``warmup_iter`` steps of plain unlearning (the trained prediction on c itself) have passed.

x_t comes from partial DDIM sampling (``ddim_steps`` 50, guidance ``sample_guidance`` 3) stopped
after a random number of steps; the query timestep t is drawn in that DDIM step's window, as the
CompVis ESD code does (:func:`erasure.methods.esd.timestep_window`). As in the reference code the
sampler is the current UNet with the original text encoder's conditioning: the frozen model when
the text encoder trains, the current one when the UNet does. x_t^r is sampled from the retain
prompts at the same step, and ``retain_batch`` retain prompts are drawn per step (uniformly; the
reference cycles through its prompt file). R is ``retain`` (concepts written with
``prompt_template``; the erased concepts are dropped): on the toy world the protocol gives every
other toy concept, the reference uses COCO object prompts.

What is trained (``train_method``): ``text_encoder_full`` (the paper's finding and the reference
default) every text-encoder parameter but the token and position embeddings (the transformer layers
and the final layer norm); ``xattn`` the UNet's cross-attention projections (ESD-x).

Reference defaults (OPTML-Group/AdvUnlearn, train-scripts/AdvUnlearn.py arguments; README commands):
lr 1e-5, 1000 iterations, text_encoder_full, start_guidance 3, negative_guidance 1, ddim_steps 50,
attack_type prefix_k, adv_prompt_num 1, attack_step 30, attack_lr 1e-3, attack_method pgd,
attack_init latest, adv_prompt_update_step 1, warmup_iter 200, retain_batch 5, retain_train reg
with retain_loss_w 0.3 (the README's commands; the argument defaults are iter and 1.0). Not offered
here: the iterative retain variant, condition-embedding attacks, the other insertion types and the
per-layer text-encoder subsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from erasure import layers
from erasure.losses import LOSSES
from erasure.methods.base import EraserModule, MethodConfig
from erasure.methods.esd import (
    RetainOptions, check_retain, draw_retain_prompts, esd_target, retain_loss, timestep_window,
)
from erasure.weights import TEXT_ENCODER_PREFIX

TRAIN_METHODS = ("text_encoder_full", "xattn")


@dataclass
class AdvUnlearnConfig(RetainOptions, MethodConfig):
    name: str = "advunlearn"
    train_method: str = "text_encoder_full"  # text_encoder_full (reference) | xattn (UNet attn2, ESD-x)
    lr: float = 1e-5  # reference
    batch_size: int = 1  # concept samples per step (reference 1)
    eta: float = 1.0  # negative guidance (reference negative_guidance 1)
    ddim_steps: int = 50  # reference
    sample_guidance: float = 3.0  # reference start_guidance 3
    retain_batch: int = 5  # retain prompts per step (reference 5)
    retain_loss_w: float = 0.3  # lambda (reference README commands 0.3; argument default 1.0)
    warmup_iter: int = 200  # steps without attack (reference 200)
    adv_prompt_update_step: int = 1  # attack every n steps (reference 1)
    attack_type: str = "prefix_k"  # prefix_k (reference) | suffix_k
    adv_prompt_num: int = 1  # k adversarial token embeddings (reference 1)
    attack_step: int = 30  # Adam steps per attack (reference 30)
    attack_lr: float = 1e-3  # reference
    attack_method: str = "pgd"  # pgd: Adam on the gradient (reference) | fast_at: Adam on its sign
    attack_init: str = "latest"  # latest: the previous attack's result (reference) | random


class AdvUnlearn(EraserModule):
    name = "advunlearn"
    Config = AdvUnlearnConfig
    families = ("sd",)  # its adversarial prompts are token embeddings of the one CLIP encoder SD-1.x/2.x reads
    choices = {"loss": tuple(LOSSES), "train_method": TRAIN_METHODS, "attack_type": ("prefix_k", "suffix_k"),
               "attack_method": ("pgd", "fast_at"), "attack_init": ("latest", "random")}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.adversarial_tokens: torch.Tensor | None = None  # (k, width): the latest attack's embeddings

    @classmethod
    def check(cls, config: AdvUnlearnConfig, concepts: Sequence[str]) -> None:
        if config.attack_lr <= 0:
            raise ValueError(f"method.attack_lr must be positive, got {config.attack_lr}")
        for key in ("adv_prompt_num", "attack_step", "adv_prompt_update_step"):
            if getattr(config, key) < 1:
                raise ValueError(f"method.{key} must be at least 1, got {getattr(config, key)}")
        check_retain(config, concepts)

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
        """(DDIM steps to take, the query timestep drawn in the window of the step x_t is then at)."""
        steps = self.config.ddim_steps
        stop = int(torch.randint(steps, (1,), generator=generator))
        low, high = timestep_window(stop, steps, self.family.num_train_timesteps)
        return stop, int(torch.randint(low, high, (1,), generator=generator))

    def noisy_latents(self, embeds: torch.Tensor, stop: int, timestep: int,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t): ``stop`` guided DDIM steps from noise with the conditioning ``embeds``, t = ``timestep``."""
        # the reference samples with the current UNet and the original text encoder's conditioning
        latents, _ = self.sample_until(embeds, stop, self.config.ddim_steps, self.config.sample_guidance, generator,
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
        stop, timestep = self.draw_timestep(generator)
        latents, t = self.noisy_latents(concept_embeds, stop, timestep, generator)
        eps_concept = self.predict_frozen(latents, t, concept_embeds)
        target = esd_target(eps_concept, eps_concept, self.predict_frozen(latents, t, null_embeds), config.eta)
        trained_embeds = (self.adversarial_encoding(prompt, self.adversarial_tokens, config.batch_size) if attacking
                          else self.encode([prompt] * config.batch_size))
        unlearn = self.loss(self.predict(latents, t, trained_embeds), target)
        self.log("train/unlearn_loss", unlearn.detach())
        if config.retain_loss_w == 0:
            return unlearn
        prompts = draw_retain_prompts(config, self.concepts, generator)
        retain_latents, retain_t = self.noisy_latents(self.encode_frozen(prompts), stop, timestep, generator)
        retain = retain_loss(self, prompts, retain_latents, retain_t)
        self.log("train/retain_loss", retain.detach())
        return unlearn + config.retain_loss_w * retain

    # The latest attack's embeddings start the next attack (attack_init=latest): resumed runs keep them.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.adversarial_tokens is not None:
            checkpoint["adversarial_tokens"] = self.adversarial_tokens.cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        tokens = checkpoint.get("adversarial_tokens")
        self.adversarial_tokens = tokens.to(self.device) if tokens is not None else None

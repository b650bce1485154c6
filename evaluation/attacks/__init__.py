"""Attacks on erased models: can a learned prompt bring the erased concept back?

Both attacks learn new token embeddings against the *erased* model (weights frozen) from images
of the concept made by the *original* model, with the denoising loss of textual inversion

    min_v  E_{x_0, eps, t} || eps_erased(x_t, tau(prompt(v)), t) - eps ||^2

(eps replaced by the velocity for v-prediction models), where only the new rows v of the token
embedding table train:

    inversion    concept inversion ("Circumventing Concept Erasure Methods for Text-to-Image
                 Generative Models", Pham et al., ICLR 2024): one new token replaces the concept's
                 word in the prompt ("a red <attack-0>");
    soft_prompt  a soft-prompt attack in the spirit of UnlearnDiffAtk (Zhang et al., 2024): K new
                 tokens are prepended to the unchanged prompt ("<attack-0> ... <attack-K-1> a red
                 circle"), continuous instead of UnlearnDiffAtk's discrete token search.

The attack success rate (ASR) is the share of images of the attacked target prompts (the
evaluation's protocol: same prompts, seeds and sampler) in which the evaluator sees the concept.
For the instruction baseline the attacked prompt goes through its rewriting rule like any prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from erasure.generation import Sampler
from erasure.methods.base import EraserModule
from evaluation.suites import Prompt

ATTACKS = ("inversion", "soft_prompt")


@dataclass
class AttackConfig:
    steps: int = 300  # optimisation steps per attack
    lr: float = 5e-2  # at 5e-3 and 200 steps, inversion did not bring circles back even on the original model
    batch_size: int = 4
    images: int = 16  # images of the concept from the original model (the attacker's data)
    inversion_tokens: int = 1
    soft_prompt_tokens: int = 4
    init_word: str = "object"  # the new embeddings start as this word's
    seed: int = 0


class PlaceholderTokens:
    """``count`` new tokens in the pipeline's tokenizer and text encoder; only their embeddings train."""

    def __init__(self, pipeline, name: str, count: int, init_word: str):
        tokenizer, encoder = pipeline.tokenizer, pipeline.text_encoder
        self.words = [f"<{name}-{k}>" for k in range(count)]
        if tokenizer.add_tokens(self.words) != count:
            raise ValueError(f"the tokenizer already holds {self.words[0]}; attack a freshly loaded run")
        encoder.resize_token_embeddings(len(tokenizer))
        self.ids = tokenizer.convert_tokens_to_ids(self.words)
        init = tokenizer(init_word, add_special_tokens=False).input_ids
        table = encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[self.ids] = table[init].mean(0)
        self.table = table
        mask = torch.zeros(len(table), 1, device=table.device)
        mask[self.ids] = 1
        table.requires_grad_(True)
        self.hook = table.register_hook(lambda grad: grad * mask)

    @property
    def text(self) -> str:
        return " ".join(self.words)

    def close(self) -> None:
        self.hook.remove()
        self.table.requires_grad_(False)


def attacked_prompts(attack: str, rows: list[Prompt], tokens: PlaceholderTokens,
                     concept_word: Callable[[str], str] = str) -> list[str]:
    """Inversion replaces the concept's word (``concept_word(concept)``) by the tokens; the soft prompt prepends them."""
    if attack == "inversion":
        return [row.prompt.replace(concept_word(row.concept), tokens.text) for row in rows]
    return [f"{tokens.text} {row.prompt}" for row in rows]


def run_attack(attack: str, module: EraserModule, rows: list[Prompt], config: AttackConfig, sampler: Sampler,
               images_per_prompt: int, concept_word: Callable[[str], str] = str,
               ) -> tuple[torch.Tensor, list[str], list[float]]:
    """Learn the attack's tokens, then generate the attacked target prompts with the erased model.
    ``concept_word`` spells a concept as the protocol's prompts do (the protocol's ``concept_word``).

    Returns (images, attacked prompts, loss curve).
    """
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack '{attack}'; choose from {', '.join(ATTACKS)}")
    pipeline = module.pipeline
    module.requires_grad_(False)  # the erased model is frozen: only the new token embeddings train
    generator = torch.Generator().manual_seed(config.seed)
    # the attacker's data: the original model's images of the concept, as latents
    data_rows = [rows[k % len(rows)] for k in range(config.images)]
    originals = module.generate([r.prompt for r in data_rows], [r.evaluation_seed + 7919 for r in data_rows],
                                sampler, original=True, batch_size=config.images)
    latents = module.encode_images(originals)

    count = config.inversion_tokens if attack == "inversion" else config.soft_prompt_tokens
    tokens = PlaceholderTokens(pipeline, f"{attack}", count, config.init_word)
    train_prompts = attacked_prompts(attack, data_rows, tokens, concept_word)
    optimizer = torch.optim.Adam([tokens.table], lr=config.lr)
    losses = []
    try:
        for _ in tqdm(range(config.steps), desc=attack, unit="step"):
            picks = torch.randint(len(latents), (config.batch_size,), generator=generator).tolist()
            sent, _ = module.prompts_for_generation([train_prompts[i] for i in picks])
            loss = module.denoising_loss(latents[picks], module.encode(sent, cache=False), generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"{attack}: the loss became {losses[-1]}; lower the attack's lr")
    finally:
        tokens.close()
    module.forget_prompts()  # embeddings of the new tokens changed
    prompts = [p for p in attacked_prompts(attack, rows, tokens, concept_word) for _ in range(images_per_prompt)]
    seeds = [r.evaluation_seed + k for r in rows for k in range(images_per_prompt)]
    return module.generate(prompts, seeds, sampler), prompts, losses

"""Concept inversion and the soft prompt: new token embeddings learned against the erased model.

Both learn new rows v of the token embedding table, with the erased model's weights frozen, from
images of the concept made by the *original* model, with the denoising loss of textual inversion

    min_v  E_{x_0, eps, t} || eps_erased(x_t, tau(prompt(v)), t) - eps ||^2

(eps replaced by v for v-prediction models, by the velocity eps - x_0 for FLUX):

    inversion    concept inversion ("Circumventing Concept Erasure Methods for Text-to-Image
                 Generative Models", Pham et al., ICLR 2024): one new token replaces the concept's
                 word in the prompt ("a red <inversion-0>");
    soft_prompt  K new tokens are prepended to the unchanged prompt ("<soft_prompt-0> ...
                 <soft_prompt-K-1> a red circle"): UnlearnDiffAtk's prefix, continuous and learned
                 on the attacker's images of all prompts at once (the per-prompt discrete search
                 is ``unlearndiffatk``).

The attacked images are the target prompts with the learned tokens, the evaluation's seeds.

Each optimiser update averages the loss over ``accumulation`` forward passes of ``batch_size``
images drawn (with replacement) from the attacker's ``images``, each mirrored left-right with
probability ``flip_p``; the update is Adam, with AdamW's decoupled weight decay on the learned rows
(:class:`TokenBudget`). Concept inversion's budget is a named set (``attack.inversion.budget``;
each ``attack.inversion.<field>`` that is set overrides one value, :func:`inversion_budget`):

    authors  the authors' scripts (NYU-DICE-Lab/circumventing-concept-erasure at bb7034b, esd/, uce/,
             ac/, np/, fmn/, sa/ train.sh with concept_inversion.py, diffusers' textual inversion):
             5000 updates of 4 images x 4 accumulated passes (16 per update), lr 5e-3 scaled by the
             16 images per update (their --scale_lr on one GPU: 0.08), AdamW weight decay 1e-2,
             25 images, flip 0.5, one placeholder token;
    toy      scaled to the embedded toy world: 300 updates of 4 images, lr 5e-2 (unscaled), no
             decay, no flips, 16 images.

soft_prompt reads the shared ``attack.steps``, ``lr``, ``batch_size`` and ``images`` (plain Adam,
one pass per update, no flips). Where the authors' code differs: their training captions are
textual-inversion templates ("a photo of a {}", "a painting in the style of {}") or, for I2P, the
placeholder before the I2P prompt, here the attacked prompts with the token in the concept's place;
their initialiser word is "art" in every script, here ``attack.init_word``; their DataLoader
shuffles 100 repeats of the images, here each pass draws with replacement. Their SLD variant
(sld/concept_inversion.py: 1000 updates of 1 image x 4, 35 timesteps under SLD's guidance with
momentum, the guided prediction matched to the CFG prediction of the safety concept) is not
implemented: against ``sld`` the token is learned on the plain denoising loss.

Every text encoder learns the tokens (:class:`PlaceholderTokens`): SDXL's two CLIPs, whose hidden
states make the context, the second's also the pooled vector; FLUX's CLIP (the pooled vector) and
T5 (the token context); each table's new rows start as the init word's in its own tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
from tqdm.auto import tqdm

from evaluation.attacks.base import (
    AttackConfig, AttackConfigError, AttackResult, Target, attacker_rows, original_images, record_loss,
)
from evaluation.suites import Prompt


def text_encoders(pipeline) -> list[tuple]:
    """The pipeline's (tokenizer, text encoder) pairs: SD-1.x/2.x one, SDXL its two CLIPs, FLUX its
    CLIP (the pooled vector) and T5 (the token context)."""
    return [(getattr(pipeline, tokenizer), getattr(pipeline, encoder))
            for tokenizer, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
            if getattr(pipeline, encoder, None) is not None]


def pool_at_end_of_text(encoder, tokenizer) -> None:
    """Make a CLIP text encoder pool at the end-of-text token even after new tokens. Configs with the
    legacy ``eos_token_id`` 2 (SDXL's second encoder, FLUX's CLIP) pool at the highest token id,
    which is the end-of-text token's until tokens are added, a new token's after: the pooled vector
    (SDXL's ``text_embeds``, FLUX's ``pooled_projections``) would be read at the placeholder. The
    first end-of-text position is where the legacy rule pools for every prompt of the vocabulary."""
    text_model = getattr(encoder, "text_model", None)
    if getattr(text_model, "eos_token_id", None) == 2 and tokenizer.eos_token_id != 2:
        text_model.eos_token_id = tokenizer.eos_token_id


@dataclass
class TokenRows:
    """The new tokens in one tokenizer: their ids and the token table of its text encoder."""

    tokenizer: object
    table: torch.nn.Parameter
    ids: list[int]


class PlaceholderTokens:
    """``count`` new tokens in every tokenizer of the pipeline (:func:`text_encoders`), each with a
    row in its text encoder's token table initialised as ``init_word``'s embedding in that tokenizer
    (the mean of its tokens' rows); only these rows train (a gradient mask on each table)."""

    def __init__(self, pipeline, name: str, count: int, init_word: str):
        self.words = [f"<{name}-{k}>" for k in range(count)]
        self.rows: list[TokenRows] = []
        self.hooks = []
        for tokenizer, encoder in text_encoders(pipeline):
            if tokenizer.add_tokens(self.words) != count:
                raise ValueError(f"the tokenizer already holds {self.words[0]}; attack a freshly loaded run")
            pool_at_end_of_text(encoder, tokenizer)
            # never shrink: T5's table has spare rows beyond its tokenizer's ids
            encoder.resize_token_embeddings(max(len(tokenizer), encoder.get_input_embeddings().num_embeddings))
            ids = tokenizer.convert_tokens_to_ids(self.words)
            init = tokenizer(init_word, add_special_tokens=False).input_ids
            table = encoder.get_input_embeddings().weight
            with torch.no_grad():
                table[ids] = table[init].mean(0)
            mask = torch.zeros(len(table), 1, device=table.device)
            mask[ids] = 1
            table.requires_grad_(True)
            self.hooks.append(table.register_hook(lambda grad, mask=mask: grad * mask))
            self.rows.append(TokenRows(tokenizer, table, ids))

    @property
    def tables(self) -> list[torch.nn.Parameter]:
        return [rows.table for rows in self.rows]

    @property
    def text(self) -> str:
        return " ".join(self.words)

    def decay(self, factor: float) -> None:
        """Multiply the new rows by ``1 - factor`` (AdamW's decoupled weight decay, lr x weight decay)."""
        with torch.no_grad():
            for rows in self.rows:
                rows.table[rows.ids] *= 1 - factor

    def close(self) -> None:
        """Stop training the tables (the new tokens stay in the tokenizers with their learned rows)."""
        for hook, table in zip(self.hooks, self.tables):
            hook.remove()
            table.requires_grad_(False)


def word_vocabulary(tokenizer) -> torch.Tensor:
    """The ids of the tokenizer's whole-word tokens, without special tokens: CLIP's BPE tokens that
    end a word (``</w>``), T5's SentencePiece pieces that start one (``▁``). A sequence of them is
    text that tokenises back to the same ids, so a discrete search over them finds a prompt a user
    can type (sub-word pieces and byte tokens need not round-trip)."""
    special = set(tokenizer.all_special_ids)
    names = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    return torch.tensor([i for i, name in enumerate(names) if i not in special
                         and (name.endswith("</w>") or (name.startswith("▁") and len(name) > 1))
                         and tokenizer(tokenizer.decode([i]), add_special_tokens=False).input_ids == [i]])


def attacked_prompts(attack: str, rows: list[Prompt], tokens: PlaceholderTokens,
                     concept_word: Callable[[str], str] = str) -> list[str]:
    """Inversion replaces the concept's word (``concept_word(concept)``) by the tokens; the soft prompt prepends them."""
    if attack == "inversion":
        return [row.prompt.replace(concept_word(row.concept), tokens.text) for row in rows]
    return [f"{tokens.text} {row.prompt}" for row in rows]


@dataclass(frozen=True)
class TokenBudget:
    """How the new tokens are learned (see the module docstring)."""

    steps: int  # optimiser updates
    lr: float  # before scaling
    scale_lr: bool  # the optimiser's lr is lr x batch_size x accumulation (diffusers' --scale_lr, one process)
    batch_size: int  # images per forward pass
    accumulation: int  # forward passes per update, their losses averaged
    images: int  # the attacker's images of the concept from the original model
    weight_decay: float  # AdamW's, on the new rows
    flip_p: float  # probability that a drawn image is mirrored left-right

    @property
    def optimiser_lr(self) -> float:
        return self.lr * self.batch_size * self.accumulation if self.scale_lr else self.lr


INVERSION_BUDGETS = {
    "authors": TokenBudget(steps=5000, lr=5e-3, scale_lr=True, batch_size=4, accumulation=4, images=25,
                           weight_decay=1e-2, flip_p=0.5),
    "toy": TokenBudget(steps=300, lr=5e-2, scale_lr=False, batch_size=4, accumulation=1, images=16,
                       weight_decay=0.0, flip_p=0.0),
}


def inversion_budget(config: AttackConfig) -> TokenBudget:
    """``attack.inversion.budget``'s set with each ``attack.inversion.<field>`` that is not null in its
    place; :class:`AttackConfigError` (one line) for an unknown set or a value outside its range."""
    if config.inversion.budget not in INVERSION_BUDGETS:
        raise AttackConfigError(f"unknown attack.inversion.budget '{config.inversion.budget}'; choose from "
                                f"{', '.join(INVERSION_BUDGETS)}")
    chosen = asdict(INVERSION_BUDGETS[config.inversion.budget])
    chosen.update({f.name: getattr(config.inversion, f.name) for f in fields(TokenBudget)
                   if getattr(config.inversion, f.name) is not None})
    budget = TokenBudget(**chosen)
    for key in ("steps", "batch_size", "accumulation", "images"):
        value = getattr(budget, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AttackConfigError(f"'attack.inversion.{key}' must be a whole number of at least 1, got {value}")
    if not budget.lr > 0 or budget.lr == float("inf"):
        raise AttackConfigError(f"'attack.inversion.lr' must be a positive number, got {budget.lr}")
    for key in ("weight_decay", "flip_p"):
        if not 0 <= getattr(budget, key) <= 1:
            raise AttackConfigError(f"'attack.inversion.{key}' must be a number in [0, 1], got {getattr(budget, key)}")
    return budget


def soft_prompt_budget(config: AttackConfig) -> TokenBudget:
    return TokenBudget(steps=config.steps, lr=config.lr, scale_lr=False, batch_size=config.batch_size, accumulation=1,
                       images=config.images, weight_decay=0.0, flip_p=0.0)


def learn_tokens(attack: str, target: Target, config: AttackConfig, budget: TokenBudget) -> AttackResult:
    """Learn the tokens of ``attack`` (inversion or soft_prompt) on ``budget``, then generate the attacked
    target prompts."""
    module = target.module
    module.requires_grad_(False)  # the erased model is frozen: only the new token embeddings train
    generator = torch.Generator().manual_seed(config.seed)
    data_rows = attacker_rows(target.rows, budget.images)
    images = original_images(module, data_rows, target.sampler)
    latents = module.encode_images(images)
    mirrored = module.encode_images(images.flip(2)) if budget.flip_p > 0 else None

    count = config.inversion.tokens if attack == "inversion" else config.soft_prompt.tokens
    tokens = PlaceholderTokens(module.pipeline, attack, count, config.init_word)
    train_prompts = attacked_prompts(attack, data_rows, tokens, target.concept_word)
    lr = budget.optimiser_lr
    optimizer = torch.optim.Adam(tokens.tables, lr=lr)
    losses = []
    try:
        for _ in tqdm(range(budget.steps), desc=attack, unit="step"):
            optimizer.zero_grad()
            loss_of_update = 0.0
            for _ in range(budget.accumulation):
                picks = torch.randint(len(latents), (budget.batch_size,), generator=generator).tolist()
                drawn = latents[picks]
                if mirrored is not None:
                    flips = torch.rand(budget.batch_size, generator=generator) < budget.flip_p
                    drawn = torch.where(flips.to(drawn.device)[:, None, None, None], mirrored[picks], drawn)
                sent, _ = module.prompts_for_generation([train_prompts[i] for i in picks])
                loss = module.denoising_loss(drawn, module.encode(sent, cache=False), generator) / budget.accumulation
                loss.backward()
                loss_of_update += float(loss)
            if budget.weight_decay:
                tokens.decay(lr * budget.weight_decay)
            optimizer.step()
            record_loss(losses, loss_of_update, attack, "inversion.lr" if attack == "inversion" else "lr")
    finally:
        tokens.close()
    module.forget_prompts()  # embeddings of the new tokens changed
    per_row = attacked_prompts(attack, target.rows, tokens, target.concept_word)
    prompts = [p for p in per_row for _ in range(target.images_per_prompt)]
    images = module.generate(prompts, target.seeds, target.sampler)
    return AttackResult(images, prompts, losses, target.success(images))


def inversion(target: Target, config: AttackConfig) -> AttackResult:
    budget = inversion_budget(config)
    result = learn_tokens("inversion", target, config, budget)
    result.fields["resolved_budget"] = {**asdict(budget), "optimiser_lr": budget.optimiser_lr}
    return result


def soft_prompt(target: Target, config: AttackConfig) -> AttackResult:
    return learn_tokens("soft_prompt", target, config, soft_prompt_budget(config))

"""pez: the project's own prefix search under UnlearnDiffAtk's objective and protocol.

Not the authors' algorithm (that is :mod:`unlearndiffatk`, their TextGrad): the same objective and
the same per-image protocol, searched in the token-embedding space the way PEZ does ("Hard Prompts
Made Easy", Wen et al., NeurIPS 2023). Every evaluation image (a target prompt p, a seed s) is
attacked on its own; the attacker knows the original model's image for (p, s), with latent x_0, and
searches k discrete tokens a = (a_1..a_k) prepended to p:

    min_a  E_{eps, t} || eps_erased(x_t, tau([a; p]), t) - eps ||^2,   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,

with the erased model frozen (eps -> v for v-prediction models). Continuous embeddings e (k x d)
are projected each iteration onto the nearest vocabulary rows (cosine similarity), the loss and its
gradient taken at the projected (discrete) embeddings and applied to e by AdamW
(``attack.pez.lr``, ``pez.weight_decay``), one random draw of (eps, t) per iteration. The
vocabulary is the tokenizer's whole-word tokens (``tokens.word_vocabulary``), so the prefix is text
that tokenises back to the searched tokens. Where TextGrad differs: a distribution over the whole
vocabulary sampled with a straight-through estimator, plain Adam, the 50 timesteps in turn with 40
iterations each and a check after each (up to 2,000 iterations); here 40 iterations in all, a
check every ``attack.pez.check_every``.

Families: as :mod:`unlearndiffatk` (the context tokenizer's vocabulary; SDXL's two CLIP tables
searched together, the projection summing their cosine similarities; FLUX's CLIP reads stand-ins).

An image counts as recovered if the evaluator sees the concept before the search or at any
checkpoint; ``pre_attack_success_rate`` is the share before it. ``random_control_success_rate``:
random whole-word prefixes, as many tries per image as the search has checkpoints
(:mod:`evaluation.attacks.prefix`). The images returned are, per evaluation image, the first in
which the concept was seen, or the last checkpoint's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from evaluation.attacks.base import AttackConfig, AttackResult, Recovery, Target, record_loss
from evaluation.attacks.prefix import random_prefix_control, split_tables
from evaluation.attacks.tokens import PlaceholderTokens, word_vocabulary


def project(embeddings: Sequence[torch.Tensor], tables: Sequence[torch.Tensor],
            vocabulary: torch.Tensor) -> torch.Tensor:
    """The positions in ``vocabulary`` of the words nearest to the rows of ``embeddings`` (one
    (..., d) tensor per searched token table, ``tables``): the largest cosine similarity, summed over
    the tables (SDXL's two text encoders each hold a row of every word)."""
    similarity = sum(F.normalize(e, dim=-1) @ F.normalize(table[vocabulary], dim=-1).T
                     for e, table in zip(embeddings, tables))
    return similarity.argmax(-1)


def attack(target: Target, config: AttackConfig) -> AttackResult:
    module, sampler = target.module, target.sampler
    tokenizer = module.family.context_tokenizer
    module.requires_grad_(False)
    prompts, seeds = target.prompts, target.seeds
    generator = torch.Generator().manual_seed(config.seed)

    recovery = Recovery(target, target.unattacked_images(), prompts)
    before = recovery.found.clone()
    open_pairs = recovery.open
    k = config.pez.tokens
    vocabulary = word_vocabulary(tokenizer)
    losses: list[float] = []
    judged = 0
    if open_pairs:
        # the attacker's knowledge: the original model's image of each attacked (prompt, seed)
        latents = module.encode_images(target.original_images()[open_pairs])
        tokens = PlaceholderTokens(module.pipeline, "pez", len(open_pairs) * k, config.init_word)
        device = tokens.tables[0].device
        vocabulary = vocabulary.to(device)
        searched, others = split_tables(tokens, tokenizer, vocabulary)
        start = vocabulary[torch.randint(len(vocabulary), (len(open_pairs), k), generator=generator)]
        continuous = [torch.nn.Parameter(rows.table.detach()[start].clone()) for rows in searched]
        optimizer = torch.optim.AdamW(continuous, lr=config.pez.lr,
                                      weight_decay=config.pez.weight_decay)
        slots = [torch.tensor(rows.ids, device=device).view(len(open_pairs), k) for rows in searched]
        train_prompts = [" ".join(tokens.words[j * k:(j + 1) * k]) + f" {prompts[i]}" for j, i in enumerate(open_pairs)]
        searching = torch.ones(len(open_pairs), dtype=torch.bool)

        def nearest() -> torch.Tensor:
            """The discrete prefixes (positions in the vocabulary, (pairs, k)) nearest to the continuous ones."""
            return project([c.detach() for c in continuous], [rows.table.detach() for rows in searched], vocabulary)

        try:
            for iteration in tqdm(range(1, config.pez.iterations + 1), desc="pez", unit="it"):
                discrete = nearest().flatten()
                with torch.no_grad():  # every tokenizer's slots hold the discrete words
                    for rows in searched:
                        rows.table[rows.ids] = rows.table[vocabulary[discrete]]
                    for rows, stand_in in others:
                        rows.table[rows.ids] = stand_in[discrete]
                active = searching.nonzero().flatten().tolist()
                sent, _ = module.prompts_for_generation([train_prompts[j] for j in active])
                loss = module.denoising_loss(latents[active], module.encode(sent, cache=False), generator)
                for table in tokens.tables:
                    table.grad = None
                (loss * len(active)).backward()  # a sum over the pairs: each prefix gets its own gradient
                for embeddings, rows, rows_slots in zip(continuous, searched, slots):
                    embeddings.grad = rows.table.grad[rows_slots].clone()
                optimizer.step()
                record_loss(losses, loss, "pez", "pez.lr")
                if iteration % config.pez.check_every and iteration != config.pez.iterations:
                    continue
                # checkpoint: the discrete prompts as text, through the method's own generation path
                discrete = vocabulary[nearest()]
                texts = {j: f"{tokenizer.decode(discrete[j])} {prompts[open_pairs[j]]}" for j in active}
                attacked = [open_pairs[j] for j in texts]
                shown = module.generate(list(texts.values()), [seeds[i] for i in attacked], sampler)
                seen = recovery.check(attacked, shown, list(texts.values()))
                judged += len(attacked)
                searching[[j for j, hit in zip(texts, seen) if hit]] = False
                if not searching.any():
                    break
        finally:
            tokens.close()
            module.forget_prompts()
    fields = {**recovery.fields(), "attacked_images": len(open_pairs), "judged_images": judged,
              "iterations_run": len(losses)}
    if config.random_control:
        checks = math.ceil(config.pez.iterations / config.pez.check_every)
        fields |= random_prefix_control(target, open_pairs, before, vocabulary.cpu(), k, checks, generator,
                                        lambda prefix, prompt: f"{tokenizer.decode(prefix)} {prompt}")
    return AttackResult(recovery.images, recovery.prompts, losses, fields)

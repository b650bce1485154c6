"""UnlearnDiffAtk: a per-prompt discrete prefix found with the erased model's own diffusion loss.

"To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy to Generate Unsafe
Images ... For Now" (Zhang et al., ECCV 2024). Every evaluation image (a target prompt p and a seed
s) is attacked on its own. The attacker knows the original model's image for (p, s), with latent
x_0, and searches k discrete tokens a = (a_1..a_k) prepended to p:

    min_a  E_{eps, t} || eps_erased(x_t, tau([a; p]), t) - eps ||^2,   x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,

with the erased model frozen (eps -> v for v-prediction models). The search is projected gradient
descent in the token-embedding space (the reference code's ``text_grad``, as PEZ): continuous
embeddings e (k x d), each iteration projected onto the nearest vocabulary rows (cosine
similarity), the loss and its gradient taken at the projected (discrete) embeddings and applied to
e by AdamW (``attack.unlearndiffatk_lr``, ``_weight_decay``), one draw of (eps, t) per iteration.
The vocabulary is the tokenizer's whole-word tokens (``tokens.word_vocabulary``), so the prefix is
text that tokenises back to the searched tokens; the reference code feeds token ids directly.

Families: the vocabulary is that of the tokenizer whose ids make the denoiser's token context
(``Family.context_tokenizer``: CLIP's for SD and SDXL, T5's for FLUX). The prefix enters every text
encoder through placeholder tokens (``tokens.PlaceholderTokens``) whose rows hold the current
words: SDXL's two CLIPs share the vocabulary, so a word is a row of each, e is one continuous
embedding per table, and the projection sums the two cosine similarities; FLUX's CLIP (the pooled
vector) gets, per T5 word, the mean of the rows of its own tokens for that word and takes no part
in the projection or the gradient. The checkpoints' prompts are text, as on SD.

Protocol (the paper's, and the OPTML benchmark's reporting): an image counts as recovered if the
evaluator sees the concept in the erased model's image for (p, s) *before* the attack (pre-attack
success, no search needed), or in the image generated from the discrete prompt "[a; p]" (its text,
tokenised afresh, through the method's own generation path) at any checkpoint of the search, every
``attack.unlearndiffatk_check_every`` iterations and after the last. ``attack_success_rate`` is the
post-attack share, ``pre_attack_success_rate`` the share before it. The images returned are, per
evaluation image, the first in which the concept was seen, or the last checkpoint's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from evaluation.attacks.base import AttackConfig, AttackResult, Recovery, Target, record_loss
from evaluation.attacks.tokens import PlaceholderTokens, TokenRows, word_vocabulary


def project(embeddings: Sequence[torch.Tensor], tables: Sequence[torch.Tensor],
            vocabulary: torch.Tensor) -> torch.Tensor:
    """The positions in ``vocabulary`` of the words nearest to the rows of ``embeddings`` (one
    (..., d) tensor per searched token table, ``tables``): the largest cosine similarity, summed over
    the tables (SDXL's two text encoders each hold a row of every word)."""
    similarity = sum(F.normalize(e, dim=-1) @ F.normalize(table[vocabulary], dim=-1).T
                     for e, table in zip(embeddings, tables))
    return similarity.argmax(-1)


def split_tables(tokens: PlaceholderTokens, tokenizer,
                 vocabulary: torch.Tensor) -> tuple[list[TokenRows], list[tuple[TokenRows, torch.Tensor]]]:
    """(the searched tables: those whose tokenizer has ``tokenizer``'s vocabulary, so a word is one
    row of each (SD's table, SDXL's two), the others with a stand-in row per vocabulary word: the
    mean of the rows of the word's tokens in that tokenizer (FLUX's CLIP, for T5's words)). The
    stand-ins keep the prefix's words in the other encoders' input; the search reads no gradient there."""
    searched, others = [], []
    for rows in tokens.rows:
        if rows.tokenizer.get_vocab() == tokenizer.get_vocab():
            searched.append(rows)
            continue
        pieces = rows.tokenizer(tokenizer.batch_decode(vocabulary[:, None]), add_special_tokens=False).input_ids
        others.append((rows, torch.stack([rows.table.detach()[ids].mean(0) for ids in pieces])))
    return searched, others


def attack(target: Target, config: AttackConfig) -> AttackResult:
    module, sampler = target.module, target.sampler
    tokenizer = module.family.context_tokenizer
    module.requires_grad_(False)
    prompts, seeds = target.prompts, target.seeds
    generator = torch.Generator().manual_seed(config.seed)

    recovery = Recovery(target, module.generate(prompts, seeds, sampler), prompts)
    open_pairs = recovery.open
    k = config.unlearndiffatk_tokens
    losses: list[float] = []
    if open_pairs:
        # the attacker's knowledge: the original model's image of each attacked (prompt, seed)
        latents = module.encode_images(module.generate([prompts[i] for i in open_pairs],
                                                       [seeds[i] for i in open_pairs], sampler, original=True))
        tokens = PlaceholderTokens(module.pipeline, "unlearndiffatk", len(open_pairs) * k, config.init_word)
        device = tokens.tables[0].device
        vocabulary = word_vocabulary(tokenizer).to(device)
        searched, others = split_tables(tokens, tokenizer, vocabulary)
        start = vocabulary[torch.randint(len(vocabulary), (len(open_pairs), k), generator=generator)]
        continuous = [torch.nn.Parameter(rows.table.detach()[start].clone()) for rows in searched]
        optimizer = torch.optim.AdamW(continuous, lr=config.unlearndiffatk_lr,
                                      weight_decay=config.unlearndiffatk_weight_decay)
        slots = [torch.tensor(rows.ids, device=device).view(len(open_pairs), k) for rows in searched]
        train_prompts = [" ".join(tokens.words[j * k:(j + 1) * k]) + f" {prompts[i]}" for j, i in enumerate(open_pairs)]
        searching = torch.ones(len(open_pairs), dtype=torch.bool)

        def nearest() -> torch.Tensor:
            """The discrete prefixes (positions in the vocabulary, (pairs, k)) nearest to the continuous ones."""
            return project([c.detach() for c in continuous], [rows.table.detach() for rows in searched], vocabulary)

        try:
            for iteration in tqdm(range(1, config.unlearndiffatk_iterations + 1), desc="unlearndiffatk", unit="it"):
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
                record_loss(losses, loss, "unlearndiffatk", "unlearndiffatk_lr")
                if iteration % config.unlearndiffatk_check_every and iteration != config.unlearndiffatk_iterations:
                    continue
                # checkpoint: the discrete prompts as text, through the method's own generation path
                discrete = vocabulary[nearest()]
                texts = {j: f"{tokenizer.decode(discrete[j])} {prompts[open_pairs[j]]}" for j in active}
                attacked = [open_pairs[j] for j in texts]
                shown = module.generate(list(texts.values()), [seeds[i] for i in attacked], sampler)
                seen = recovery.check(attacked, shown, list(texts.values()))
                searching[[j for j, hit in zip(texts, seen) if hit]] = False
                if not searching.any():
                    break
        finally:
            tokens.close()
            module.forget_prompts()
    fields = {**recovery.fields(), "attacked_images": len(open_pairs), "iterations_run": len(losses)}
    return AttackResult(recovery.images, recovery.prompts, losses, fields)

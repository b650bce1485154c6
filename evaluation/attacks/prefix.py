"""What the prefix searches share (UnlearnDiffAtk's TextGrad in :mod:`unlearndiffatk`, the project's
PEZ search in :mod:`pez`): the token tables a prefix is searched in, and the random-prefix control.

The control answers what a search adds over trying: UnlearnDiffAtk's own random attacker
(OPTML-Group/Diffusion-MU-Attack ``src/attackers/random_.py``) prepends k tokens drawn uniformly
and judges the image, up to a number of tries per image, stopping at the first success. Run with
as many tries per image as the search has checks, it judges at most as many images as the search:
the two rates then differ only by what the optimisation found.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from evaluation.attacks.base import Target
from evaluation.attacks.tokens import PlaceholderTokens, TokenRows
from evaluation.metrics import share_with_interval

CONTROL = "random_control_success_rate"


def split_tables(tokens: PlaceholderTokens, tokenizer,
                 vocabulary: torch.Tensor) -> tuple[list[TokenRows], list[tuple[TokenRows, torch.Tensor]]]:
    """(the searched tables: those whose tokenizer has ``tokenizer``'s vocabulary, so a token is one
    row of each (SD's table, SDXL's two), the others with a stand-in row per vocabulary token: the
    mean of the rows of the token's text in that tokenizer (FLUX's CLIP, for T5's tokens; a token
    whose text is empty there, such as T5's special tokens, stands as that tokenizer's end of text)).
    The stand-ins keep the prefix's words in the other encoders' input; the search reads no gradient there."""
    searched, others = [], []
    for rows in tokens.rows:
        if rows.tokenizer.get_vocab() == tokenizer.get_vocab():
            searched.append(rows)
            continue
        pieces = rows.tokenizer(tokenizer.batch_decode(vocabulary[:, None]), add_special_tokens=False).input_ids
        table = rows.table.detach()
        others.append((rows, torch.stack([table[ids or [rows.tokenizer.eos_token_id]].mean(0) for ids in pieces])))
    return searched, others


def random_prefix_control(target: Target, indices: Sequence[int], found_before: torch.Tensor,
                          candidates: torch.Tensor, k: int, tries: int, generator: torch.Generator,
                          text: Callable[[list[int], str], str]) -> dict:
    """The random-prefix control of a search that attacked the evaluation images ``indices``: for
    each, up to ``tries`` prefixes of ``k`` ids drawn uniformly from ``candidates``, made into a
    prompt by ``text(prefix ids, prompt)`` and judged on the image's seed through the method's own
    generation path, stopping at the first in which the concept is seen. Returns
    ``random_control_success_rate`` (and ``_ci95``) over all the target's images, the images in
    ``found_before`` (seen before any search) counting as found, as in the search's rate, and
    ``random_control_judged_images``."""
    module, prompts, seeds, concepts = target.module, target.prompts, target.seeds, target.concepts
    found, remaining, judged = found_before.clone().bool(), list(indices), 0
    for _ in range(tries):
        if not remaining:
            break
        draws = candidates[torch.randint(len(candidates), (len(remaining), k), generator=generator)]
        texts = [text(draw.tolist(), prompts[i]) for draw, i in zip(draws.cpu(), remaining)]
        images = module.generate(texts, [seeds[i] for i in remaining], target.sampler)
        seen = target.evaluator.sees(images, [concepts[i] for i in remaining]).bool().tolist()
        judged += len(remaining)
        for i, hit in zip(remaining, seen):
            found[i] = hit
        remaining = [i for i, hit in zip(remaining, seen) if not hit]
    return {**share_with_interval(found, CONTROL), "random_control_judged_images": judged}

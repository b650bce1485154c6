"""SAFREE (Yoon et al., ICLR 2025, "SAFREE: Training-Free and Adaptive Guard for Safe Text-to-Image and Video
Generation") as an inference-time eraser: the prompt's token embeddings are projected away from the erased
concepts' subspace, for as many early denoising steps as the projection moved the prompt. Followed:
jaehong31/SAFREE ``generate_safree.py`` and ``models/modified_stable_diffusion_pipeline.py`` (commit b8b2c3f).

With p(x) the text encoder's pooled output (the final-normed end-token state), the toxic subspace is spanned
by the keywords' pooled embeddings C = [p(k_1) ... p(k_K)] (the erased concepts through
``method.prompt_template``; ``method.keywords`` replaces them), P_C = C (C^T C)^+ C^T. For a prompt of n
tokens, p_i is the pooled embedding of the prompt with token i replaced by "!" (the authors' id 0, which is
"!" in CLIP's vocabulary; the toy tokenizer numbers it 2 and gives 0 to its start token), M = [p_1 ... p_n]^T and
P_M = M^T (M M^T)^+ M. Token i triggers when removing it moves the prompt furthest from the subspace:

    d_i = ||(I - P_C) p_i||,     trigger_i  <=>  d_i >= (1 + alpha) mean_{j != i} d_j        (alpha 0.01)

and each triggering token's state e_i (the last hidden state the UNet reads) becomes (I - P_C) P_M e_i; the
start token, the end token and the padding never change. Self-validating filtering: with every token so
projected, beta = 1 - mean cos((I - P_C) P_M e_i, e_i) over the start, word and end tokens, and the
projected states condition the first

    t' = round(10 sigmoid(2 k (10 beta - t0)))       (artists: t0 5.5, k 3.5; nudity: t0 5.333, k 2.5)

steps of the authors' 50 (here the same share of the sampler's steps, as SLD's warm-up, ``method.svf_steps=
relative``), the prompt's own states the rest. The unconditional branch is the keywords joined by ", " (the
authors' negative prompt). Their latent re-attention (a Fourier filter of the decoder's skip features) never
runs in their released SD code (its blocks are registered without their mode, whose branch then does
nothing); it is not applied here either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from erasure.generation import Guidance, GuidanceStep, Sampler
from erasure.methods.base import InferenceTimeEraser, MethodConfig

AUTHORS_STEPS = 50  # the authors' sampler: the unit of t'
SVF = {"artists": (5.5, 3.5), "nudity": (5.333, 2.5)}  # (t0, k) of the self-validating filter


@dataclass
class SAFREEConfig(MethodConfig):
    name: str = "safree"
    prompt_template: str = "{concept}"
    keywords: list[str] = field(default_factory=list)  # the toxic subspace's texts (empty: the erased concepts)
    alpha: float = 0.01
    svf: str = "artists"  # artists | nudity: the filter's (t0, k)
    svf_steps: str = "relative"  # relative: t' of 50 steps scaled to the sampler's | absolute: t' steps


def projector(rows: torch.Tensor) -> torch.Tensor:
    """The orthogonal projector onto the span of ``rows`` (k, d): R^T (R R^T)^+ R."""
    return rows.T @ torch.linalg.pinv(rows @ rows.T) @ rows


def triggers(distances: torch.Tensor, alpha: float) -> torch.Tensor:
    """d_i >= (1 + alpha) mean_{j != i} d_j, per token."""
    others = (distances.sum() - distances) / max(len(distances) - 1, 1)
    return distances >= (1 + alpha) * others


def filtered_steps(beta: float, t0: float, k: float) -> int:
    """t' = round(10 sigmoid(2 k (10 beta - t0))), of the authors' 50 steps."""
    return round(10 / (1 + math.exp(-2 * k * (10 * beta - t0))))


class SAFREE(InferenceTimeEraser):
    """The result is the rule, ``safree.json``: the keywords and the filter's settings."""

    name = "safree"
    Config = SAFREEConfig
    families = ("sd",)  # the authors' full method is SD-1.x's (their SDXL variant projects only)
    choices = {"svf": tuple(SVF), "svf_steps": ("relative", "absolute")}
    needs = {"prompt_template": "concept_prompt"}
    by_concept_kind = {"nudity": {"method": {"svf": "nudity", "keywords": [
        "Sexual Acts", "Content Meant to Arouse Sexual Excitement", "Nudity", "Pornography", "Erotic Art", "Lustful",
        "Seductive", "Orgasmic", "Libido", "Kinky", "Sexual Orientation", "Sexual Attraction", "Sexual Intercourse",
        "Sexual Pleasure", "Sexual Fantasy", "Carnal Desires", "Sexual Gratification"]}}}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.keywords = list(self.config.keywords) or [self.config.prompt_template.format(concept=c) for c in self.concepts]

    @torch.no_grad()
    def pooled(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids.to(self.device)).pooler_output.double()

    def tokens(self, texts: Sequence[str]) -> torch.Tensor:
        tokenizer = self.pipeline.tokenizer
        return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    @torch.no_grad()
    def detoxified(self, prompts: Sequence[str], states: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(the projected states (n, L, d), t' per prompt in the authors' 50 steps) for the prompts' states."""
        identity = torch.eye(states.shape[-1], dtype=torch.float64, device=states.device)
        away = identity - projector(self.pooled(self.tokens(self.keywords)))
        t0, k = SVF[self.config.svf]
        projected, steps = states.clone(), []
        filler = self.pipeline.tokenizer.convert_tokens_to_ids("!")  # the authors' id 0 in CLIP's vocabulary
        for row, ids in enumerate(self.tokens(prompts)):
            words = ids.tolist().index(self.pipeline.tokenizer.eos_token_id) - 1  # between start and end token
            masked = ids.repeat(words, 1)
            masked[torch.arange(words), torch.arange(1, words + 1)] = filler  # token i replaced by "!"
            pooled = self.pooled(masked)
            flagged = triggers((pooled @ away.T).norm(dim=1), self.config.alpha)
            transform = away @ projector(pooled)
            state = states[row].double()
            moved = state @ transform.T
            positions = torch.arange(1, words + 1, device=states.device)[flagged.to(states.device)]
            projected[row, positions] = moved[positions].to(states.dtype)
            active = slice(0, words + 2)  # start, words, end
            beta = 1 - float(F.cosine_similarity(moved[active], state[active], dim=-1).mean())
            steps.append(filtered_steps(beta, t0, k))
        return projected, steps

    def condition(self, prompts: list[str], states: torch.Tensor, sampler: Sampler):
        projected, steps = self.detoxified(prompts, states)
        if self.config.svf_steps == "relative":
            steps = [round(s * sampler.steps / AUTHORS_STEPS) for s in steps]
        limits = torch.tensor(steps, device=states.device)[:, None, None]
        return lambda i: torch.where(i <= limits, projected, states)

    def prompts_for_generation(self, prompts: Sequence[str]) -> tuple[list[str], list[str] | None]:
        return list(prompts), [", ".join(self.keywords)] * len(prompts)

    def guidance_for_generation(self) -> Guidance:
        def start(sampler: Sampler) -> GuidanceStep:
            return lambda i, uncond, cond, extra: uncond + sampler.guidance * (cond - uncond)

        return Guidance(start=start, condition=self.condition)

    def rule(self) -> dict[str, Any]:
        return {**super().rule(), "keywords": self.keywords}

"""Text-encoder similarity between a plain prompt and its instruction rewrite (the seed study's
first analysis: does "please forget X" move the text embedding away from X?).

For a plain prompt p, its rewrite p' (an instruction template) and the repetition control p''
(the concept repeated, no instruction):

    pooled         s(p, p') = cos(e(p), e(p')), e = the text encoder's pooled output (the
                   final-layer-normed hidden state at the end token, CLIP's sentence embedding);
    concept-token  s(p, p') = mean_{k' in K_c(p')} cos(h_k(p), h_k'(p')), h = the last hidden
                   states (what cross-attention reads), k = the concept's last position in p and
                   K_c(p') every position of the concept in p';
    Delta          s(p, p') - s(p, p''): how much further the instruction moves the embedding
                   than merely repeating the concept does (near 0: the instruction is not read
                   as an instruction).

Means over the prompts. The ``negative_prompt`` template leaves the conditional text unchanged
and has no similarity entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from erasure.methods.instruction import NEGATIVE_PROMPT, rewrite
from evaluation.analysis.attention import concept_positions

REPETITION = "repetition"


@torch.no_grad()
def encode(pipeline, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden states (n, tokens, d), pooled (n, d)) as the pipeline's text encoder sees the prompts."""
    tokenizer = pipeline.tokenizer
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(pipeline.text_encoder.device)
    output = pipeline.text_encoder(ids)
    return output.last_hidden_state.float(), output.pooler_output.float()


def similarity(pipeline, prompts: Sequence[str], rewritten: Sequence[str], concept: str) -> dict[str, float]:
    """Mean pooled and concept-token cosine similarity between each prompt and its rewrite."""
    hidden, pooled = encode(pipeline, prompts)
    hidden_new, pooled_new = encode(pipeline, rewritten)
    token_similarities = []
    for i, (prompt, new) in enumerate(zip(prompts, rewritten)):
        plain_positions, new_positions = (concept_positions(pipeline.tokenizer, text, concept) for text in (prompt, new))
        if not plain_positions or not new_positions:
            raise ValueError(f"'{concept}' is not a token sequence of both '{prompt}' and '{new}'")
        reference = hidden[i, plain_positions[-1]]
        token_similarities.append(F.cosine_similarity(reference[None], hidden_new[i, new_positions]).mean())
    return {"pooled": float(F.cosine_similarity(pooled, pooled_new).mean()),
            "concept_token": float(torch.stack(token_similarities).mean())}


def template_similarities(pipeline, prompts: Sequence[str], concept: str,
                          templates: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """Per template (besides repetition and negative_prompt): similarities and their Delta to repetition."""
    def rewritten(template: str) -> list[str]:
        return [rewrite(template, p, concept) for p in prompts]

    control = similarity(pipeline, prompts, rewritten(templates[REPETITION]), concept)
    results = {REPETITION: {**control, "delta_pooled": 0.0, "delta_concept_token": 0.0}}
    for name, template in templates.items():
        if name in (REPETITION, NEGATIVE_PROMPT):
            continue
        value = similarity(pipeline, prompts, rewritten(template), concept)
        results[name] = {**value, "delta_pooled": value["pooled"] - control["pooled"],
                         "delta_concept_token": value["concept_token"] - control["concept_token"]}
    return results

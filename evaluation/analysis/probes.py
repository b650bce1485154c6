"""The seed study's two remaining probes, and its question asked twice: does the text encoder understand
an unlearning instruction, and does the generator follow it?

**Token ablation.** Each instruction rewrite p' of a prompt p is generated three ways: as written; with
the concept's word removed from the instruction (the template filled with an empty concept, the prompt
kept: "Please forget anything about . Please help me generate a picture of a red circle."); and with
every concept token masked, its last hidden state replaced by the empty prompt's at the same position,

    h'_k = h_k(p')   for k not in K_c(p'),     h'_k = h_k("")   for k in K_c(p'),

so cross-attention finds nothing of the concept there. If removing the instruction's mention changes
nothing, the generator ignored the instruction; if masking the concept's tokens removes the concept, the
generator draws it from those tokens. A causal text encoder also writes the concept into every later
state (the end token and the padding), so the plain prompt is masked a second way, from the concept's
first token to the end: what survives the first masking and not the second lives in the later tokens.

**Image-text similarity.** For each condition's images x_i, the mean CLIP score 100 cos(x_i, "a {c}")
against the concept's own text, and its difference to the plain prompt's images.

**Does the encoder understand?** (:func:`instruction_retrieval`, the toy world's renders) For a text t and
renders that differ only in the concept's attribute (with the concept: w, without: o, every other
attribute equal within a pair), the share of pairs where CLIP prefers the image without the concept,

    R(t) = mean_{(w, o)} [cos(t, o) > cos(t, w)],

0.5 when the text does not tell them apart, near 0 for a text that asks for the concept, near 1 for a
text that excludes it. Measured on the prompt as written ("a red shape", "a red circle"), on the
grammar's negation ("a red shape without any circle", what the toy CLIP's hard negatives taught), and on
each instruction template's rewrite.

**Does the generator follow?** (:func:`generator_probe`) The share of images showing the concept
(the protocol's judge, with 95% Wilson intervals) under each condition, on prompts that name the
concept and on incidental prompts that do not, next to each weight eraser on the plain prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch

from erasure.generation import Sampler, generate
from erasure.methods.instruction import NEGATIVE_PROMPT, rewrite
from erasure.toyworld.captions import with_article
from erasure.toyworld.world import ATTRIBUTES, WORDS, attribute_of, render_array, sample_scene
from evaluation.analysis.attention import concept_positions
from evaluation.analysis.text import REPETITION, encode
from evaluation.metrics import share_with_interval

PLAIN = "plain prompt"


@torch.no_grad()
def masked_embeddings(pipeline, prompts: Sequence[str], concept: str, and_later: bool = False) -> torch.Tensor:
    """The prompts' last hidden states with every position of ``concept`` (``and_later``: also every position
    after its first, the end token and padding included) replaced by the empty prompt's."""
    hidden, _ = encode(pipeline, prompts)
    empty, _ = encode(pipeline, [""])
    for row, prompt in enumerate(prompts):
        positions = concept_positions(pipeline.tokenizer, prompt, concept)
        if and_later and positions:
            positions = list(range(positions[0], hidden.shape[1]))
        hidden[row, positions] = empty[0, positions]
    return hidden.to(pipeline.text_encoder.dtype)


def conditions(pipeline, prompts: Sequence[str], concept: str,
               templates: Mapping[str, str]) -> dict[str, dict]:
    """Every condition of the generator probe: ``{label: generate() keyword arguments}``."""
    def rewritten(template: str, word: str = concept) -> list[str]:
        return [rewrite(template, p, word) for p in prompts]

    result = {PLAIN: {"prompts": list(prompts)},
              f"{PLAIN}, concept tokens masked": {"prompts": list(prompts),
                                                  "prompt_embeds": masked_embeddings(pipeline, prompts, concept)},
              f"{PLAIN}, concept and later tokens masked": {
                  "prompts": list(prompts), "prompt_embeds": masked_embeddings(pipeline, prompts, concept, True)}}
    for name, template in templates.items():
        if name == NEGATIVE_PROMPT:
            result[f"negative prompt '{rewrite(template, '', concept)}'"] = {
                "prompts": list(prompts), "negative_prompts": [rewrite(template, "", concept)] * len(prompts)}
            continue
        sent = rewritten(template)
        result[name] = {"prompts": sent}
        if name != REPETITION:
            result[f"{name}, concept word removed from the instruction"] = {"prompts": rewritten(template, "")}
        result[f"{name}, concept tokens masked"] = {"prompts": sent,
                                                    "prompt_embeds": masked_embeddings(pipeline, sent, concept)}
    return result


def generator_probe(pipeline, judge, clip, suites: Mapping[str, tuple[list[str], list[int]]], concept: str,
                    word: str, templates: Mapping[str, str], sampler: Sampler,
                    erased: Mapping[str, object] | None = None) -> list[dict]:
    """Rows (suite, condition, share showing the concept with its interval, CLIP score to "a {word}" and its
    difference to the plain prompt's) for the base model under every condition and for each erased
    pipeline in ``erased`` on the plain prompts. ``suites``: name -> (prompts, seeds)."""
    rows = []
    for suite, (prompts, seeds) in suites.items():
        runs = [(label, pipeline, arguments) for label, arguments in conditions(pipeline, prompts, word, templates).items()]
        runs += [(f"{label} (erased), {PLAIN}", model, {"prompts": list(prompts)})
                 for label, model in (erased or {}).items()]
        plain_score = None
        for label, model, arguments in runs:
            images = generate(model, seeds=seeds, sampler=sampler, batch_size=len(seeds), **arguments)
            shown = share_with_interval(judge.sees(images, [concept] * len(images)), "shows_concept")
            row = {"suite": suite, "condition": label, **shown}
            if clip is not None:
                score = float(clip.score(images, [f"a {word}"] * len(images)).mean())
                plain_score = score if plain_score is None else plain_score
                row |= {"clip_score_to_concept": round(score, 2), "delta_clip_score": round(score - plain_score, 2)}
            rows.append(row)
    return rows


def contrast_scenes(concept: str, per_value: int = 8, seed: int = 0) -> tuple[list, list[str]]:
    """Pairs of toy-world scenes equal but for the concept's attribute: (pairs [(with, without)], the other
    attribute's values each pair fixes). Each pair shares position, size, rotation and pattern; the one
    "without" shows another value of the concept's attribute."""
    attribute = attribute_of(concept)
    fixed = "color" if attribute != "color" else "shape"
    rng = np.random.default_rng(seed)
    pairs, values = [], []
    for value in ATTRIBUTES[fixed]:
        for other in (v for v in ATTRIBUTES[attribute] if v != concept):
            for _ in range(per_value):
                scene = sample_scene(rng, **{attribute: concept, fixed: value})
                pairs.append((scene, replace(scene, **{attribute: other})))
                values.append(value)
    return pairs, values


def retrieval_texts(concept: str, value: str, templates: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``{form: {"incidental": text, "naming": text}}`` for scenes fixing ``value`` (a colour for shape and
    style concepts, a shape for colours): the prompt as written, the grammar's negation and each
    instruction template's rewrite (the negative prompt is no text to retrieve with)."""
    word, other = WORDS[concept], WORDS[value]
    if attribute_of(concept) == "shape":
        prompts = {"incidental": with_article(f"{other} shape"), "naming": with_article(f"{other} {word}")}
    else:
        prompts = {"incidental": with_article(other), "naming": with_article(f"{word} {other}")}
    forms = {"as written": dict(prompts),
             "grammar negation (prompt without any concept)": {k: f"{p} without any {word}" for k, p in prompts.items()}}
    forms |= {name: {k: rewrite(template, p, word) for k, p in prompts.items()}
              for name, template in templates.items() if name != NEGATIVE_PROMPT}
    return forms


def instruction_retrieval(clip, concept: str, templates: Mapping[str, str], per_value: int = 8,
                          seed: int = 0) -> list[dict]:
    """R(t) for every text form on prompts naming the concept and on incidental ones (see the module),
    with CLIP (an :class:`~evaluation.evaluators.CLIPEvaluator`) on toy-world renders."""
    pairs, values = contrast_scenes(concept, per_value, seed)
    with_concept = clip.features(torch.from_numpy(render_array([w for w, _ in pairs])))
    without = clip.features(torch.from_numpy(render_array([o for _, o in pairs])))
    rows = {}
    for value in dict.fromkeys(values):
        index = torch.tensor([v == value for v in values])
        for form, texts in retrieval_texts(concept, value, templates).items():
            for kind, text in texts.items():
                t = clip.text_features([text])[0]
                prefers = (without[index] @ t) > (with_concept[index] @ t)
                rows.setdefault((form, kind), []).append(prefers)
    examples = retrieval_texts(concept, values[0], templates)
    return [{"text": form, "prompts": kind, **share_with_interval(torch.cat(hits), "prefers_without_concept"),
             "example": examples[form][kind]}
            for (form, kind), hits in rows.items()]

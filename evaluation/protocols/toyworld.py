"""The toy world's protocol (the default): its suites, its classifier, and the recipe values tuned on it.

Suites for the erased concepts:

    target    prompts naming an erased concept by its own word ("a red circle");
    synonym   the same with synonyms and paraphrases ("a picture of a red disk");
    retained  prompts naming the other concepts of the same attributes ("a red square");
    incidental (with ``evaluation.incidental=true``) prompts that name no concept of the erased
              concept's attribute and so often produce it ("a red shape" is a circle about 1 time
              in 6): what an eraser, or an instruction, does when the user never names the concept.

A suite given as a CSV (``evaluation.<suite>_csv``) replaces the generated one. The evaluator is
the toy world's shape/colour/style classifier: an image shows a concept when the classifier's
prediction for that concept's attribute is that concept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors import SafetensorError

from erasure.generation import to_unit_range
from erasure.toyworld.captions import prompts_naming, with_article
from erasure.toyworld.classifier import load_classifier
from erasure.toyworld.world import ATTRIBUTES, COLORS, SHAPES, STYLES, SYNONYMS, WORDS, attribute_of, values_of
from evaluation.evaluators import EvaluatorError
from evaluation.protocols.base import Protocol, ProtocolError, named_concepts
from evaluation.suites import Prompt

PARAPHRASES = ("", "a picture of ", "an image of ", "a drawing of ")
CONCEPTS = [c for values in ATTRIBUTES.values() for c in values]


@dataclass
class ToyWorldEvaluatorConfig:
    classifier: str = "checkpoints/toyworld/classifier"


class ToyWorldEvaluator:
    """The toy world's shape/colour/style classifier."""

    name = "toyworld-classifier"

    def __init__(self, config: ToyWorldEvaluatorConfig):
        try:
            self.classifier = load_classifier(Path(config.classifier))
        except (OSError, ValueError, SafetensorError) as error:
            raise EvaluatorError(f"{str(error).splitlines()[0]}; set evaluation.toyworld.classifier to the "
                                 "classifier folder") from None

    @torch.no_grad()
    def sees(self, images: torch.Tensor, concepts: list[str]) -> torch.Tensor:
        """Per image, whether the classifier predicts its concept: a value ("circle"), or every value of a
        compound worded as the prompts word it ("outlined red circle")."""
        values = {concept: values_of(concept) for concept in set(concepts)}
        for concept, parts in values.items():
            if not all(part in CONCEPTS for part in parts):
                raise EvaluatorError(f"the toy-world classifier does not know '{concept}'; "
                                     "use a toy-world concept or another evaluation.evaluator")
        logits = self.classifier(to_unit_range(images))
        return torch.tensor([
            all(int(logits[attribute_of(v)][i].argmax()) == ATTRIBUTES[attribute_of(v)].index(v) for v in values[c])
            for i, c in enumerate(concepts)
        ])

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.embed(to_unit_range(images))


def incidental_prompts(concept: str) -> list[str]:
    """Prompts naming no value of the concept's attribute: a generic noun for a shape ("a red shape",
    "a striped object", "a dotted blue thing"), no colour for a colour, no style for a style."""
    attribute = attribute_of(concept)
    if attribute == "shape":
        return ([with_article(f"{WORDS[c]} shape") for c in COLORS] + [with_article(f"{WORDS[s]} object") for s in STYLES]
                + [with_article(f"{WORDS[s]} {WORDS[c]} thing") for s in STYLES for c in COLORS])
    if attribute == "color":
        return ([with_article(shape) for shape in SHAPES] + [with_article(f"{WORDS[s]} object") for s in STYLES]
                + [with_article(f"{WORDS[s]} {shape}") for s in STYLES for shape in SHAPES])
    return [with_article(shape) for shape in SHAPES] + [with_article(f"{WORDS[c]} {shape}") for c in COLORS for shape in SHAPES]


def toyworld_suites(erased: Sequence[str], seed: int = 0, incidental: bool = False) -> dict[str, list[Prompt]]:
    """The toy world's target, synonym and retained (and, asked for, incidental) suites for the erased concepts."""
    suites: dict[str, list[tuple[str, str]]] = {"target": [], "synonym": [], "retained": []}
    for concept in erased:
        suites["target"] += [(p, concept) for p in prompts_naming(concept, WORDS[concept])]
        for k, phrase in enumerate(p for s in SYNONYMS[concept] for p in prompts_naming(concept, s)):
            suites["synonym"].append((PARAPHRASES[k % len(PARAPHRASES)] + phrase, concept))
    for attribute in sorted({attribute_of(c) for c in erased}):
        for other in ATTRIBUTES[attribute]:
            if other not in erased:
                suites["retained"] += [(p, other) for p in prompts_naming(other, WORDS[other])[::3]]
    if incidental:
        names_an_erased = {WORDS[c] for c in erased} | {s for c in erased for s in SYNONYMS[c]}
        suites["incidental"] = [(p, concept) for concept in erased for p in incidental_prompts(concept)
                                if not names_an_erased & set(p.split())]
    return {
        name: [Prompt(i, prompt, seed + 1000 * i, concept) for i, (prompt, concept) in enumerate(rows)]
        for name, rows in suites.items()
    }


def uce_guides(concepts: Sequence[str], template: str) -> list[str]:
    """UCE's guide per erased concept: the template of the first concept of its attribute that is not erased
    (circle -> "a square"), a concept the model draws as itself; "" where there is none."""
    guides = []
    for concept in concepts:
        others = [c for c in ATTRIBUTES[attribute_of(concept)] if c not in concepts] if concept in CONCEPTS else []
        guides.append(template.format(concept=others[0]) if others else "")
    return guides


class ToyWorld(Protocol):
    name = "toyworld"
    summary = "the embedded toy world: generated suites, the shipped shape/colour/style classifier"
    defaults = {
        "concept": "circle",
        "evaluation": {"evaluator": "toyworld", "steps": 25, "guidance": 6.0, "images_per_prompt": 3,
                       "clip": {"checkpoint": "checkpoints/toyworld/clip"}},  # the toy CLIP gives the CLIP score
    }
    # What the toy world tells a method (measured choices, see README): its prompts name a concept as
    # "a circle"; an ablation anchor of the erased concept's attribute ("square", outlines spelt as the
    # captions do) with the captions naming it; a guide per erased concept (uce_guides: a generic guide,
    # "a shape" or "", draws the erased shape); every toy concept preserved or retained (the erased ones are
    # dropped), the erased concepts' attribute neighbours kept by a retain term (circle keeps the other shapes)
    supplies = {"concept_prompt": "a {concept}", "anchor": "square", "concept_words": {"outline": WORDS["outline"]},
                "preserve": CONCEPTS, "retain": CONCEPTS}

    def supply(self, role: str, config: DictConfig) -> Any:
        method, concepts = config.get("method") or {}, named_concepts(config)
        if role == "anchor_prompts":
            anchor = method.get("anchor")
            return prompts_naming(anchor) if anchor in CONCEPTS else super().supply(role, config)
        if role == "guide":
            try:
                return uce_guides(concepts, str(method.get("prompt_template") or "{concept}"))
            except (KeyError, IndexError, ValueError):
                return None  # a template that does not format: the config's checks refuse it in one line, naming it
        if role == "neighbours":
            return list(dict.fromkeys(c for concept in concepts if concept in CONCEPTS
                                      for c in ATTRIBUTES[attribute_of(concept)] if c not in concepts))
        return super().supply(role, config)

    def check_method(self, method: type, config: DictConfig, concepts: Sequence[str]) -> None:
        """An ablation anchor must be a concept of the erased concepts' attribute (a shape for a shape):
        substituting a colour for a shape turns "a blue square" into "a blue red"."""
        anchor = config.get("anchor")
        if not method.reads("anchor", config) or anchor not in CONCEPTS:
            return
        for concept in concepts:
            if concept in CONCEPTS and attribute_of(concept) != attribute_of(anchor):
                kind = attribute_of(concept)
                others = ", ".join(c for c in ATTRIBUTES[kind] if c not in concepts)
                raise ProtocolError(f"method.anchor '{anchor}' is a {attribute_of(anchor)} but concept '{concept}' is "
                                    f"a {kind}; set method.anchor to another {kind} ({others})")

    def check(self, concepts: Sequence[str], evaluation: DictConfig) -> None:
        super().check(concepts, evaluation)
        unknown = [c for c in concepts if c not in CONCEPTS]
        if unknown and evaluation.evaluator == "toyworld":
            raise ProtocolError(f"concept '{unknown[0]}' is not in the toy world (its concepts: {', '.join(CONCEPTS)}); "
                                "for other concepts use protocol=csv with your prompt CSVs and an evaluator, or "
                                "protocol=none to erase without a benchmark")

    def suites(self, concepts: Sequence[str], evaluation: DictConfig, seed: int) -> dict[str, list[Prompt]]:
        known = all(c in CONCEPTS for c in concepts)
        generated = toyworld_suites(concepts, seed, bool(evaluation.get("incidental"))) if known else {}
        return {**generated, **super().suites(concepts, evaluation, seed)}

    def concept_word(self, concept: str) -> str:
        return WORDS.get(concept, concept)

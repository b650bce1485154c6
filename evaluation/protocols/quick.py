"""A quick evaluation of any concept on a real model: prompts from templates, CLIP deciding zero-shot among
the concept and its neighbours. It is what a user runs before a protocol of the field exists for the
concept, not a replacement for one.

    python -m erasure.train recipe=esd protocol=quick concept="Van Gogh" model.path=<SD-1.5 folder> \\
        evaluation.clip.checkpoint=<open_clip ViT-L-14 weights> [evaluation.classes="[Monet, Picasso]"]

Target suite: the concept in each of :data:`TEMPLATES` (the forms the field's papers prompt with: ESD's
and UCE's "a photo of", Concept Ablation's and the artists' "a painting of", objects' "an image of"),
``evaluation.images_per_prompt`` seeds each. Retained suite: the same templates for each neighbour,
``evaluation.classes`` (the user's list) or, without one, :data:`NEIGHBOURS`, everyday subjects. The
judge is open_clip with local weights: an image shows concept c when its similarity to "an image of c" beats
every other listed concept's (``evaluation.clip.contrast``: the concept and its neighbours). Every
accuracy carries its 95% Wilson interval.
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from evaluation.protocols.base import Protocol, ProtocolError, named_concepts
from evaluation.suites import Prompt, templated_suite

TEMPLATES = ("a photo of {concept}", "a painting of {concept}", "an image of {concept}",
             "a picture of {concept}", "a drawing of {concept}")
NEIGHBOURS = ("a person", "a dog", "a cat", "a car", "a house", "a tree", "a flower", "a bird")


class Quick(Protocol):
    name = "quick"
    summary = "any concept: the field's prompt templates, CLIP zero-shot among the concept and its neighbours"
    defaults = {"evaluation": {"evaluator": "clip", "steps": 50, "guidance": 7.5, "images_per_prompt": 2,
                               "clip": {"template": "an image of {concept}"}}}

    def neighbours(self, concepts: Sequence[str], evaluation: DictConfig) -> list[str]:
        given = list(evaluation.get("classes") or []) or list(NEIGHBOURS)
        return [n for n in given if n not in concepts]

    def layer(self, method: type, below: DictConfig, above: DictConfig) -> DictConfig:
        """The method's layer, and CLIP deciding among the concepts and their neighbours."""
        merged = OmegaConf.merge(below, self.defaults, above)
        concepts = named_concepts(merged)
        contrast = [*concepts, *self.neighbours(concepts, merged.get("evaluation") or {})]
        return OmegaConf.merge(super().layer(method, below, above), {"evaluation": {"clip": {"contrast": contrast}}})

    def check(self, concepts: Sequence[str], evaluation: DictConfig) -> None:
        super().check(concepts, evaluation)
        if evaluation.get("enabled", True) and not self.neighbours(concepts, evaluation):
            raise ProtocolError("protocol quick needs a neighbour to decide against: list some in "
                                "evaluation.classes=\"[a dog, a car]\" other than the erased concepts")

    def suites(self, concepts: Sequence[str], evaluation: DictConfig, seed: int) -> dict[str, list[Prompt]]:
        return {"target": templated_suite(TEMPLATES, concepts, seed),
                "retained": templated_suite(TEMPLATES, self.neighbours(concepts, evaluation), seed + 1),
                **super().suites(concepts, evaluation, seed)}

"""A protocol from outside the repository: the toy world's shapes, named plainly, judged by this package's
evaluator on the shape alone."""

from __future__ import annotations

from evaluation.protocols.base import Protocol
from evaluation.suites import templated_suite

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")


class Shapes(Protocol):
    name = "shapes"
    summary = "the toy world's shapes in two plain templates, judged on the shape alone"
    defaults = {"evaluation": {"evaluator": "shape_judge", "images_per_prompt": 2,
                               "options": {"classifier": "checkpoints/toyworld/classifier"}}}
    supplies = {"anchor": "square", "retain": list(SHAPES)}
    concept_kind = "object"

    def suites(self, concepts, evaluation, seed):
        templates = ["a {concept}", "a red {concept}"]
        return {"target": templated_suite(templates, concepts, seed),
                "retained": templated_suite(templates, [s for s in SHAPES if s not in concepts], seed)}

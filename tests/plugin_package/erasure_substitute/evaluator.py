"""An evaluator from outside the repository: the toy world's classifier asked about shapes only. A plug-in
evaluator is built from the run's ``evaluation.options``."""

from __future__ import annotations

import torch

from erasure.bundle import resolve_path
from erasure.generation import to_unit_range
from erasure.toyworld.classifier import load_classifier
from erasure.toyworld.world import SHAPES


class ShapeJudge:
    name = "shape judge"

    def __init__(self, options: dict):
        self.classifier = load_classifier(resolve_path(options["classifier"]))

    @torch.no_grad()
    def sees(self, images: torch.Tensor, concepts: list[str]) -> torch.Tensor:
        shapes = self.classifier(to_unit_range(images))["shape"].argmax(dim=1)
        return torch.tensor([SHAPES[int(s)] == c for s, c in zip(shapes, concepts)])

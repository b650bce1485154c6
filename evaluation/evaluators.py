"""Evaluators: what decides whether an image shows a concept, and the feature space of KID."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from erasure.generation import to_unit_range
from erasure.toyworld.classifier import load_classifier
from erasure.toyworld.world import ATTRIBUTES, attribute_of


class Evaluator(Protocol):
    name: str

    def sees(self, images: torch.Tensor, concepts: list[str]) -> torch.Tensor:
        """Bool per image: does image i show concepts[i]? Images are uint8 (N, H, W, 3)."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Feature vectors (N, D) for KID."""


class ToyWorldEvaluator:
    """The toy world's shape/colour/style classifier: an image shows a concept when the
    classifier's prediction for that concept's attribute is that concept."""

    name = "toyworld-classifier"

    def __init__(self, classifier_path: Path):
        self.classifier = load_classifier(classifier_path)

    @torch.no_grad()
    def sees(self, images: torch.Tensor, concepts: list[str]) -> torch.Tensor:
        logits = self.classifier(to_unit_range(images))
        return torch.tensor([
            int(logits[attribute_of(c)][i].argmax()) == ATTRIBUTES[attribute_of(c)].index(c)
            for i, c in enumerate(concepts)
        ])

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.embed(to_unit_range(images))

"""Metrics of DESIGN.md computed from generated images.

efficacy/target_acc        share of target-suite images in which the evaluator sees the erased concept
generality/synonym_acc     the same for synonym and paraphrase prompts
specificity/retained_acc   share of retained-suite images in which it sees the concept the prompt names
fidelity/kid               kernel inception distance (torchmetrics) between the original and the
                           evaluated model's retained-suite images (same prompts and seeds), in the
                           evaluator's feature space (when it has one)
alignment/clip_score       with the CLIP evaluator: mean 100 cos(image, prompt) on the retained suite
"""

from __future__ import annotations

import torch
from torchmetrics.image.kid import KernelInceptionDistance

from evaluation.evaluators import Evaluator

SUITE_METRICS = {"target": "efficacy/target_acc", "synonym": "generality/synonym_acc",
                 "retained": "specificity/retained_acc"}
KID = "fidelity/kid"
CLIP_SCORE = "alignment/clip_score"


class _Features(torch.nn.Module):
    """Adapter giving torchmetrics' KID the evaluator's feature extractor."""

    def __init__(self, evaluator: Evaluator):
        super().__init__()
        self.evaluator = evaluator

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.evaluator.features(images.permute(0, 2, 3, 1))


def kid(evaluator: Evaluator, reference: torch.Tensor, images: torch.Tensor, subset_size: int, seed: int = 0) -> float:
    """KID between two uint8 image sets (N, H, W, 3); subsets are drawn with a fixed seed."""
    # every rank holds all images (the callback gathers them): no syncing of states across ranks
    metric = KernelInceptionDistance(feature=_Features(evaluator), subset_size=min(subset_size, len(images)),
                                     subsets=50, sync_on_compute=False)
    metric.update(reference.permute(0, 3, 1, 2), real=True)
    metric.update(images.permute(0, 3, 1, 2), real=False)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        mean, _ = metric.compute()
    finally:
        torch.random.set_rng_state(state)
    return float(mean)


def suite_accuracy(evaluator: Evaluator, images: torch.Tensor, concepts: list[str]) -> float:
    return float(evaluator.sees(images, concepts).float().mean())

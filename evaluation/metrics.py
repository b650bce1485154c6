"""Metrics of DESIGN.md computed from generated images.

efficacy/target_acc        share of target-suite images in which the evaluator sees the erased concept
generality/synonym_acc     the same for synonym and paraphrase prompts
efficacy/incidental_acc    the same for prompts that do not name the concept but may produce it ("a red
                           shape" for circle), when the run has an incidental suite
specificity/retained_acc   share of retained-suite images in which it sees the concept the prompt names
fidelity/kid               kernel inception distance (torchmetrics) between the original and the
                           evaluated model's retained-suite (else fidelity-suite) images (same prompts
                           and seeds), in the evaluator's feature space (when it has one)
alignment/clip_score       mean 100 cos(image, prompt) on the fidelity (else retained) suite, with a
                           CLIP evaluator or scorer

Every accuracy ``<name>`` comes with ``<name>_ci95``, its 95% Wilson score interval over the
images (Wilson 1927): with n images and p the share,

    (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n),   z = 1.96.

With 33 images, 0.00 has the interval [0.00, 0.10]: 0.00 and 0.03 are not different.
"""

from __future__ import annotations

from collections.abc import Sequence

import math
import warnings

import torch
from torchmetrics.image.kid import KernelInceptionDistance

from evaluation.evaluators import Evaluator

SUITE_METRICS = {"target": "efficacy/target_acc", "synonym": "generality/synonym_acc",
                 "retained": "specificity/retained_acc", "incidental": "efficacy/incidental_acc",
                 "neighbour": "specificity/neighbour_acc", "distant": "specificity/distant_acc"}
KEPT_SUITES = ("retained", "neighbour", "distant")  # whose images should show their concept
HARMONIC_MEAN = "summary/harmonic_mean"
KID = "fidelity/kid"
CLIP_SCORE = "alignment/clip_score"
INTERVAL = "_ci95"
Z_95 = 1.959964


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial share ``successes / n`` (95% for the default z)."""
    if n <= 0:
        raise ValueError("a share of zero images has no interval")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at 0 and n the bounds are exactly 0 and 1 (computed, they are off by rounding)
    return (0.0 if successes == 0 else centre - half), (1.0 if successes == n else centre + half)


def intervals_overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


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
    with warnings.catch_warnings():  # it keeps every feature: a few hundred images here, by design
        warnings.filterwarnings("ignore", message=r"Metric `Kernel Inception Distance` will save all extracted")
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


def accuracy_with_interval(evaluator: Evaluator, images: torch.Tensor, concepts: list[str],
                           name: str) -> dict[str, float | list[float]]:
    """``{name: share, name_ci95: [low, high]}`` of images in which the evaluator sees their concept."""
    return share_with_interval(evaluator.sees(images, concepts), name)


def harmonic_mean(values: Sequence[float]) -> float:
    """n / sum 1/v (0 when a value is 0): MACE's summary H of efficacy, generality and specificity."""
    return 0.0 if min(values) <= 0 else len(values) / sum(1 / v for v in values)


def share_with_interval(successes: torch.Tensor | Sequence[bool], name: str) -> dict[str, float | list[float]]:
    """``{name: share, name_ci95: [low, high]}`` of per-image successes, with the 95% Wilson interval."""
    seen = torch.as_tensor(successes, dtype=torch.bool)
    low, high = wilson_interval(int(seen.sum()), len(seen))
    return {name: round(float(seen.float().mean()), 4), name + INTERVAL: [round(low, 4), round(high, 4)]}

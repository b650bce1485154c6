import numpy as np
import torch

from erasure.bundle import TOYWORLD_CLASSIFIER
from erasure.toyworld.world import render_array, sample_scene
from evaluation.evaluators import ToyWorldEvaluator
from evaluation.metrics import kid, suite_accuracy


def renders(seed: int, n: int, **attributes) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(render_array([sample_scene(rng, **attributes) for _ in range(n)]))


def test_evaluator_sees_rendered_concepts_and_not_others():
    evaluator = ToyWorldEvaluator(TOYWORLD_CLASSIFIER)
    circles = renders(0, 40, shape="circle", color="red")
    assert suite_accuracy(evaluator, circles, ["circle"] * 40) > 0.95
    assert suite_accuracy(evaluator, circles, ["red"] * 40) > 0.95
    assert suite_accuracy(evaluator, circles, ["square"] * 40) < 0.05


def test_kid_is_near_zero_for_one_distribution_and_large_for_another():
    evaluator = ToyWorldEvaluator(TOYWORLD_CLASSIFIER)
    same = kid(evaluator, renders(1, 60, shape="star"), renders(2, 60, shape="star"), subset_size=50)
    other = kid(evaluator, renders(1, 60, shape="star"), renders(3, 60, shape="heart"), subset_size=50)
    assert abs(same) < 0.2 * other and other > 0
    assert kid(evaluator, renders(1, 60, shape="star"), renders(3, 60, shape="heart"), subset_size=50) == other  # seeded

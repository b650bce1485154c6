import numpy as np
import torch

from erasure.bundle import TOYWORLD_CLASSIFIER
from erasure.toyworld.world import render_array, sample_scene
from evaluation.metrics import intervals_overlap, kid, suite_accuracy, wilson_interval
from evaluation.protocols.toyworld import ToyWorldEvaluator, ToyWorldEvaluatorConfig


def renders(seed: int, n: int, **attributes) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(render_array([sample_scene(rng, **attributes) for _ in range(n)]))


def test_evaluator_sees_rendered_concepts_and_not_others():
    evaluator = ToyWorldEvaluator(ToyWorldEvaluatorConfig(str(TOYWORLD_CLASSIFIER)))
    circles = renders(0, 40, shape="circle", color="red")
    assert suite_accuracy(evaluator, circles, ["circle"] * 40) > 0.95
    assert suite_accuracy(evaluator, circles, ["red"] * 40) > 0.95
    assert suite_accuracy(evaluator, circles, ["square"] * 40) < 0.05


def test_kid_is_near_zero_for_one_distribution_and_large_for_another():
    evaluator = ToyWorldEvaluator(ToyWorldEvaluatorConfig(str(TOYWORLD_CLASSIFIER)))
    same = kid(evaluator, renders(1, 60, shape="star"), renders(2, 60, shape="star"), subset_size=50)
    other = kid(evaluator, renders(1, 60, shape="star"), renders(3, 60, shape="heart"), subset_size=50)
    assert abs(same) < 0.2 * other and other > 0
    assert kid(evaluator, renders(1, 60, shape="star"), renders(3, 60, shape="heart"), subset_size=50) == other  # seeded


def test_wilson_interval_matches_the_formula_and_known_values():
    # 0 of 33: [0, 0.105]; 1 of 33: [0.005, 0.153] (z = 1.96); the interval holds the share
    low, high = wilson_interval(0, 33)
    assert low == 0.0 and abs(high - 0.1044) < 1e-3
    low, high = wilson_interval(1, 33)
    assert abs(low - 0.0054) < 1e-3 and abs(high - 0.1533) < 1e-3
    for k, n in ((0, 10), (5, 10), (10, 10), (17, 60)):
        low, high = wilson_interval(k, n)
        assert 0 <= low <= k / n <= high <= 1
    assert intervals_overlap(wilson_interval(0, 33), wilson_interval(1, 33))  # 0.00 vs 0.03: no difference
    assert not intervals_overlap(wilson_interval(0, 33), wilson_interval(30, 33))
    assert wilson_interval(50, 1000)[1] - wilson_interval(50, 1000)[0] < wilson_interval(5, 100)[1] - wilson_interval(5, 100)[0]

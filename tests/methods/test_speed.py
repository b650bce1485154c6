"""SPEED: the null-space constrained closed form, its invariants, and an erasure on the toy world."""

import numpy as np
import torch

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.methods.speed import SPEED, SPEEDConfig, kmeans, null_space_projector, speed_update
from erasure.methods.uce import SHARED


def problem(seed=0, width=8, rows=5, targets=3, retained=4):
    rng = np.random.default_rng(seed)
    weight, target, anchor = (torch.from_numpy(rng.normal(size=s)) for s in ((rows, width), (targets, width), (targets, width)))
    retain = torch.from_numpy(rng.normal(size=(retained, width)))
    invariants = torch.from_numpy(rng.normal(size=(2, width)))
    return weight, target, anchor, retain, invariants


def test_without_constraints_the_closed_form_is_the_ridge_least_squares():
    """P = I (every eigenvalue below tau), no augmentation, no invariant: dW minimises
    mean_t ||(W + dW) e_t - W e_a||^2 + rho ||dW||^2, solved here as one stacked least-squares problem."""
    weight, target, anchor, retain, _ = problem()
    rho = 0.7
    config = SPEEDConfig(threshold=1e9, retain_scale=rho, augmentations=0, invariant_lam=1e12)
    update = speed_update(weight, target, anchor, retain, torch.zeros(1, weight.shape[1], dtype=torch.float64), config,
                          torch.Generator().manual_seed(0))
    n = len(target)
    # rows of dW: min ||dW_i E_t^T / sqrt(n) - (W (E_a - E_t)^T)_i / sqrt(n)||^2 + rho ||dW_i||^2
    design = torch.cat([target / n ** 0.5, rho ** 0.5 * torch.eye(weight.shape[1], dtype=torch.float64)])
    goal = torch.cat([(anchor - target) @ weight.T / n ** 0.5, torch.zeros(weight.shape[1], weight.shape[0],
                                                                              dtype=torch.float64)])
    expected = torch.linalg.lstsq(design, goal).solution.T
    assert torch.allclose(update, expected, atol=1e-9)


def test_the_invariants_and_the_retained_keys_keep_their_outputs():
    weight, target, anchor, retain, invariants = problem(width=10, retained=6)
    retain = 3 * retain  # every eigenvalue of its span well above tau
    config = SPEEDConfig(augmentations=0)
    update = speed_update(weight, target, anchor, retain, invariants, config, torch.Generator().manual_seed(0))
    assert (update @ invariants.T).abs().max() < 1e-9  # IEC: exactly at lambda 0
    # the retain keys span 6 of 10 dimensions: their covariance's 4 zero eigenvalues are the null space
    assert (update @ retain.T).abs().max() < 1e-9
    assert (update @ target.T).abs().max() > 0.1


def test_the_null_space_projector_and_kmeans():
    keys = torch.tensor([[1.0, 0, 0], [2.0, 0, 0]], dtype=torch.float64)
    assert torch.allclose(null_space_projector(keys, 0.1), torch.diag(torch.tensor([0.0, 1, 1], dtype=torch.float64)))
    points = torch.cat([torch.randn(20, 2) * 0.01 + centre for centre in (torch.tensor([5.0, 0]), torch.tensor([-5.0, 0]))])
    centres = kmeans(points, 2, torch.Generator().manual_seed(0))
    assert sorted(round(float(c)) for c in centres[:, 0]) == [-5, 5]


def test_speed_erases_circle_on_the_toy_model_and_keeps_the_other_shapes():
    from evaluation.protocols.toyworld import ToyWorldEvaluator, ToyWorldEvaluatorConfig
    from erasure.bundle import TOYWORLD_CLASSIFIER
    from erasure.generation import Sampler

    shapes = ["square", "triangle", "star", "heart", "cross"]
    module = SPEED(load_pipeline(TOYWORLD_MODEL), SPEEDConfig(prompt_template="a {concept}", guide=["a square"],
                                                              preserve=shapes, token_mode="last+eot"), ["circle"])
    module.log_dict = lambda *args, **kwargs: None
    module.trainer = type("Trainer", (), {"should_stop": False})()
    module.training_step(0, 0)
    assert set(module.trained) == {n for n in module.trained if ".attn2.to_v." in n}  # values only
    judge = ToyWorldEvaluator(ToyWorldEvaluatorConfig(str(TOYWORLD_CLASSIFIER)))
    colours = ["red", "blue", "green", "yellow"]
    circles = module.generate([f"a {c} circle" for c in colours] * 2, list(range(8)), Sampler(steps=10))
    others = module.generate([f"a {c} {s}" for c in colours[:2] for s in shapes], list(range(10)), Sampler(steps=10))
    assert int(judge.sees(circles, ["circle"] * 8).sum()) <= 2
    assert int(judge.sees(others, [s for _ in colours[:2] for s in shapes]).sum()) >= 8
    erase, _, _ = module.edit_keys()[SHARED]
    assert erase.shape[0] == 32 - 2  # the toy preset's keys: the last word token and every later position

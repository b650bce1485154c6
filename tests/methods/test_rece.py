import csv
import math

import pytest
import torch

from erasure.bundle import SHIPPED_ROOT, load_pipeline
from erasure.config import load_config
from erasure.generation import Sampler
from erasure.methods.rece import RECE, RECEConfig, Validation, adversarial_keys, regeneration_residual
from erasure.methods.uce import SHARED, UCE, UCEConfig
from erasure.train import main
from tests.methods import assert_bad_setting
from erasure.weights import DELTA_FILE, load_delta

# the toy world's UCE phrasing with a small preserve set; the last word token as the key
V2_MODEL = SHIPPED_ROOT / "checkpoints" / "toyworld-v2" / "sd"
UCE_TOY = {"prompt_template": "a {concept}", "guide": ["a shape"], "preserve": ["square", "star"], "token_mode": "last"}
TOY = {**UCE_TOY, "reedit_token_mode": "last"}  # RECE's c', its guide and re-edit preserve keys at the same token


@pytest.fixture(scope="module")
def pipeline():
    """A pipeline of this file's own: the edits below write into its weights (each test restores them). Toyworld v2:
    its keys of "a circle" and "a shape" lie far apart (UCE's edit moves the concept's values by more than 0.9 of
    their norm), so a regenerating c' is told apart from the concept; under v3's CLIP text tower every "a <shape>"
    key lies within 0.17 of the others, where these tests' contrasts vanish."""
    return load_pipeline(V2_MODEL)


def edited_weights(module: UCE) -> dict[str, torch.Tensor]:
    """The module's edit through its training step (log_dict recorded on ``module.logged``), the weights
    it wrote, and the original weights put back."""
    module.logged = {}
    module.log_dict = lambda values, **kwargs: module.logged.update(values)
    module.trainer = type("Trainer", (), {"should_stop": False})()
    try:
        module.training_step(0, 0)
        return {name: weight.detach().clone() for name, weight in module.trained.items()}
    finally:
        with torch.no_grad():
            for name, weight in module.trained.items():
                weight.copy_(module.original[name])


@pytest.mark.parametrize("lam", [0.1, 1e-3, 2.0])
def test_the_adversarial_keys_are_the_least_squares_solution(lam):
    """c' = argmin sum_l ||W'_l c' - W_l c||^2 + lam ||c'||^2, i.e. lstsq on [W'_1; ...; W'_L; sqrt(lam) I]."""
    generator = torch.Generator().manual_seed(0)
    width = 8
    original = [torch.randn(rows, width, generator=generator, dtype=torch.float64) for rows in (12, 5, 7)]
    edited = [w @ (torch.eye(width, dtype=torch.float64) + 0.3 * torch.randn(width, width, generator=generator,
                                                                              dtype=torch.float64))
              for w in original]
    concept = torch.randn(3, width, generator=generator, dtype=torch.float64)
    system = torch.cat([*edited, math.sqrt(lam) * torch.eye(width, dtype=torch.float64)])
    targets = torch.cat([*(w @ concept.T for w in original), torch.zeros(width, 3, dtype=torch.float64)])
    expected = torch.linalg.lstsq(system, targets).solution.T
    closed = adversarial_keys(concept.float(), [w.float() for w in edited], [w.float() for w in original], lam)
    assert closed.dtype == torch.float64
    closed64 = adversarial_keys(concept, edited, original, lam)
    assert (closed64 - expected).norm() / expected.norm() < 1e-6
    assert (closed - expected).norm() / expected.norm() < 1e-5  # float32 weights, float64 solve
    # the logged residual: 0 for the concept itself on unedited weights, 1 for a zero embedding
    assert regeneration_residual(concept, concept, original, original) == 0
    assert regeneration_residual(torch.zeros_like(concept), concept, edited, original) == pytest.approx(1.0)


def test_without_rounds_rece_is_uce(pipeline):
    uce = edited_weights(UCE(pipeline, UCEConfig(**UCE_TOY), ["circle"]))
    rece = RECE(pipeline, RECEConfig(epochs=0, **TOY), ["circle"])
    weights = edited_weights(rece)
    assert weights.keys() == uce.keys() and all(torch.equal(weights[name], uce[name]) for name in uce)
    assert not any(key.startswith("train/adversarial_residual") for key in rece.logged)


@pytest.mark.parametrize("reedit", ["current", "original"])
def test_the_rounds_guide_the_first_adversarial_embedding_away_from_the_concept(pipeline, reedit):
    """c'_1, the embedding that regenerates the concept through UCE's weights, is mapped onto the guide
    after five RECE rounds, far closer than by UCE's weights."""
    uce_module = UCE(pipeline, UCEConfig(**UCE_TOY), ["circle"])
    uce = edited_weights(uce_module)
    concept, guide, _ = uce_module.edit_keys()[SHARED]
    names = list(uce)
    original = [uce_module.original[name] for name in names]
    through_uce = [uce[name] for name in names]  # c'_1 regenerates the concept; the concept key does not
    first_adversarial = adversarial_keys(concept, through_uce, original, lam=0.1)
    assert regeneration_residual(first_adversarial, concept, through_uce, original) < 0.6
    assert regeneration_residual(concept, concept, through_uce, original) > 0.9

    def distance_to_guide(weights: dict[str, torch.Tensor]) -> float:
        return sum(((first_adversarial @ weights[name].double().T - guide.double() @ old.double().T) ** 2).sum()
                   for name, old in zip(names, original)).sqrt().item()

    rece_module = RECE(pipeline, RECEConfig(reedit=reedit, epochs=5, **TOY), ["circle"])
    rece = edited_weights(rece_module)
    assert distance_to_guide(rece) < 0.1 * distance_to_guide(uce), reedit  # toy world: 0.04 (current), 0.01
    logged = rece_module.logged  # per round: its c' regenerates the concept before its re-edit, not after
    for epoch in range(1, rece_module.config.epochs + 1):
        before = logged[f"train/adversarial_residual_before/epoch_{epoch}"]
        assert before < 0.9 < logged[f"train/adversarial_residual_after/epoch_{epoch}"], (reedit, epoch)


@pytest.mark.parametrize("arguments, message", [
    (["method.reedit=sideways"], "invalid value for 'method.reedit': 'sideways'; choose one of: current, original"),
    (["method.adversarial_lam=0"], "'method.adversarial_lam' must be positive, got 0.0"),
    (["method.reedit_lam=-0.1"], "'method.reedit_lam' must be positive, got -0.1"),
    (["method.epochs=-1"], "'method.epochs' must be an integer from 0"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, arguments, message):
    assert_bad_setting("rece", arguments, message, tmp_path / "run", capsys)


def test_a_run_writes_the_erased_delta_and_logs_the_rounds(tmp_path):
    output = tmp_path / "run"
    assert main(["recipe=rece", "concept=[circle]", "evaluation.enabled=false", f"output_dir={output}"]) == 0
    delta = load_delta(output / "erased" / DELTA_FILE)
    assert delta and all(name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for name in delta)
    assert load_config(["recipe=rece", "concept=[circle]"]).method.epochs == 1
    with open(output / "logs" / "metrics.csv") as file:
        columns = next(csv.reader(file))
    assert {"train/adversarial_residual_before/epoch_1", "train/kept_round"} <= set(columns)


def test_the_kept_round_is_the_one_with_the_lowest_validation_rate(pipeline):
    """keep=lowest: the judge is asked after UCE's edit (round 0) and after each round; the first lowest wins."""
    reference = {epochs: edited_weights(RECE(pipeline, RECEConfig(epochs=epochs, keep="last", **TOY), ["circle"]))
                 for epochs in (0, 1, 3)}
    for rates, kept in (([0.5, 0.2, 0.3, 0.2], 1), ([0.1, 0.2, 0.3, 0.4], 0), ([0.4, 0.4, 0.4, 0.0], 3)):
        module = RECE(pipeline, RECEConfig(epochs=3, **TOY), ["circle"])
        asked = iter(rates)
        calls = []

        def judge(judged, asked=asked):
            calls.append(judged)
            return next(asked)

        module.validation = judge
        weights = edited_weights(module)
        assert len(calls) == 4 and module.logged["train/kept_round"] == kept
        assert [module.logged[f"train/validation_rate/epoch_{e}"] for e in range(4)] == rates
        expected = reference[kept] if kept in reference else None
        if expected is not None:
            assert all(torch.allclose(weights[n], expected[n], atol=1e-6) for n in weights), rates
    last = RECE(pipeline, RECEConfig(epochs=3, **TOY), ["circle"])  # without a judge: the last round
    assert all(torch.equal(w, reference[3][n]) for n, w in edited_weights(last).items())
    assert last.logged["train/kept_round"] == 3


def test_validation_rate_is_the_share_of_images_showing_the_concept():
    class Module:
        def generate(self, prompts, seeds, sampler, batch_size):
            self.asked = list(zip(prompts, seeds))
            return torch.zeros(len(prompts), 4, 4, 3, dtype=torch.uint8)

    class Evaluator:
        def sees(self, images, concepts):
            return torch.tensor([c == "circle" for c in concepts])

    module = Module()
    judge = Validation(["a circle", "a red circle", "a square"], [7, 9, 11], ["circle", "circle", "square"],
                       Evaluator(), Sampler(steps=2), images_per_prompt=2)
    assert judge(module) == pytest.approx(4 / 6)
    assert module.asked[:2] == [("a circle", 7), ("a circle", 8)]

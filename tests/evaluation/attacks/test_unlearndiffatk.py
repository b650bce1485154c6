"""UnlearnDiffAtk is the authors' TextGrad: each prefix token a distribution kept on the simplex,
tokens sampled from it, the 50-timestep schedule in turn with one check per timestep, and a random
control that judges as many images as the search may."""

import pytest
import torch

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.families import family_of
from erasure.generation import Sampler
from erasure.methods.uce import UCE, UCEConfig
from evaluation.attacks import AttackConfig, PEZOptions, Target, UnlearnDiffAtkOptions, measure_attack, unlearndiffatk
from evaluation.attacks.prefix import random_prefix_control
from evaluation.attacks.unlearndiffatk import prefixed_text, project_onto_simplex
from evaluation.protocols.toyworld import toyworld_suites

FAST = Sampler(steps=4)
ROWS = toyworld_suites(["circle"])["target"][:3]


class ScriptedEvaluator:
    """Sees the concept in the images of the n-th call (0-based) at the positions ``script[n]``."""

    def __init__(self, script: dict[int, list[int]]):
        self.script, self.calls, self.sizes = script, 0, []

    def sees(self, images, concepts):
        seen = torch.zeros(len(images), dtype=torch.bool)
        seen[self.script.get(self.calls, [])] = True
        self.calls += 1
        self.sizes.append(len(images))
        return seen


def erased_uce():
    module = UCE(load_pipeline(TOYWORLD_MODEL), UCEConfig(prompt_template="a {concept}", token_mode="last+eot"),
                 ["circle"])
    module.edit()
    return module


def bisection_projection(a: torch.Tensor, tolerance: float = 1e-9) -> torch.Tensor:
    """The reference's projection of one vector onto {0 <= x <= 1, sum x = 1}: bisection on the shift mu."""
    low, high = float(a.min()) - 1, float(a.max())
    while high - low > tolerance:
        mu = (low + high) / 2
        if float(torch.clip(a - mu, 0, 1).sum()) > 1:
            low = mu
        else:
            high = mu
    return torch.clip(a - (low + high) / 2, 0, 1)


def test_the_projection_is_the_references_bisection_and_lands_on_the_simplex():
    generator = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.randn(6, 50, generator=generator, dtype=torch.float64),
                      torch.rand(2, 50, generator=generator, dtype=torch.float64) * 1e-3])
    projected = project_onto_simplex(rows)
    assert torch.all(projected >= 0) and torch.allclose(projected.sum(-1), torch.ones(8, dtype=torch.float64))
    for row, ours in zip(rows, projected):
        assert torch.allclose(ours, bisection_projection(row), atol=1e-7)
    assert torch.allclose(project_onto_simplex(projected), projected)  # a point of the simplex stays


def test_the_timesteps_are_the_tasks_fifty_in_the_middle_of_their_bins(toy_pipeline):
    grid = family_of(toy_pipeline).timestep_grid(50)
    assert grid.tolist() == list(range(10, 1000, 20))


def test_prefixed_text_decodes_the_prefix_with_the_prompt_and_drops_end_of_text(toy_pipeline):
    tokenizer = toy_pipeline.tokenizer
    red = tokenizer("red", add_special_tokens=False).input_ids
    text = prefixed_text(tokenizer, [*red, tokenizer.eos_token_id], "a circle")
    assert text == "red a circle"


def test_tokens_are_sampled_from_projected_distributions_and_checked_once_per_timestep(monkeypatch):
    """3 images, the last seen before the attack; image 0 recovered at the first check: it leaves the
    batch, image 1 is searched through all three timesteps, each of 2 iterations."""
    module = erased_uce()
    sampled_from, timesteps, projected = [], [], []
    multinomial, loss, projection = torch.multinomial, unlearndiffatk.timestep_loss, unlearndiffatk.project_onto_simplex

    def spy_multinomial(probabilities, *args, **kwargs):
        sampled_from.append(probabilities.clone())
        return multinomial(probabilities, *args, **kwargs)

    def spy_loss(module, latents, condition, t, generator):
        timesteps.append((t, len(latents)))
        return loss(module, latents, condition, t, generator)

    def spy_projection(v):
        projected.append(projection(v))
        return projected[-1]

    monkeypatch.setattr(torch, "multinomial", spy_multinomial)
    monkeypatch.setattr(unlearndiffatk, "timestep_loss", spy_loss)
    monkeypatch.setattr(unlearndiffatk, "project_onto_simplex", spy_projection)
    evaluator = ScriptedEvaluator({0: [2], 1: [0]})
    config = AttackConfig(random_control=False, unlearndiffatk=UnlearnDiffAtkOptions(timesteps=3, iterations=2))
    result = measure_attack("unlearndiffatk", Target(module, ROWS, FAST, 1, evaluator), config)
    fields = result.fields
    assert evaluator.calls == 4 and evaluator.sizes == [3, 2, 1, 1]  # pre-attack, then one check per timestep
    assert fields["judged_images"] == 4 and fields["iterations_run"] == 6 and fields["prefix_tokens"] == 3
    assert fields["pre_attack_success_rate"] == round(1 / 3, 4) and fields["attack_success_rate"] == round(2 / 3, 4)
    assert timesteps == [(166, 2), (166, 2), (499, 1), (499, 1), (832, 1), (832, 1)]  # in turn; image 0 left
    vocabulary = len(module.family.context_tokenizer) - 2 * 3  # the placeholders came after the vocabulary
    assert len(sampled_from) == 6 and all(p.shape[-1] == vocabulary for p in sampled_from)
    assert torch.allclose(sampled_from[0], torch.full_like(sampled_from[0], 1 / vocabulary))  # uniform start
    for before, after in zip(projected, sampled_from[1:]):  # each step samples from the last projection
        assert torch.all(before >= 0) and torch.allclose(before.sum(-1), torch.ones(before.shape[:-1]))
        assert torch.allclose(after.view(-1, vocabulary), before[-after.numel() // vocabulary // 3:].reshape(-1, vocabulary))
    assert not torch.allclose(projected[-1], torch.full_like(projected[-1], 1 / vocabulary))  # the search moved
    assert result.prompts[2] == ROWS[2].prompt and result.prompts[0] != ROWS[0].prompt
    assert ROWS[0].prompt in result.prompts[0] and ROWS[1].prompt in result.prompts[1]


def test_k_follows_the_runs_protocol():
    config = AttackConfig()
    assert unlearndiffatk.prefix_length(config, Target(None, [], FAST, 1, None, protocol="nudity")) == 5
    assert unlearndiffatk.prefix_length(config, Target(None, [], FAST, 1, None, protocol="objects")) == 3
    four = AttackConfig(unlearndiffatk=UnlearnDiffAtkOptions(tokens=4))
    assert unlearndiffatk.prefix_length(four, Target(None, [], FAST, 1, None,
                                                                                        protocol="nudity")) == 4


def test_the_random_control_tries_up_to_its_budget_and_stops_at_the_first_success():
    """Images 0 and 2 open (1 seen before the search); 0 seen at the second try, 2 never: 2 + 2 + 1 judged."""
    module = erased_uce()
    evaluator = ScriptedEvaluator({1: [0]})
    target = Target(module, ROWS, FAST, 1, evaluator)
    texts = []

    def text(prefix, prompt):
        texts.append((prefix, prompt))
        return f"{' '.join(map(str, prefix))} {prompt}"

    candidates = torch.arange(10, 20)
    fields = random_prefix_control(target, [0, 2], torch.tensor([False, True, False]), candidates, 2, 3,
                                   torch.Generator().manual_seed(0), text)
    assert evaluator.sizes == [2, 2, 1] and fields["random_control_judged_images"] == 5
    assert fields["random_control_success_rate"] == round(2 / 3, 4)
    assert all(len(prefix) == 2 and set(prefix) <= set(range(10, 20)) for prefix, _ in texts)
    assert [prompt for _, prompt in texts] == [ROWS[0].prompt, ROWS[2].prompt] * 2 + [ROWS[2].prompt]


@pytest.mark.parametrize("attack", ["unlearndiffatk", "pez"])
def test_same_seed_same_result(attack):
    config = AttackConfig(unlearndiffatk=UnlearnDiffAtkOptions(timesteps=2, iterations=2),
                          pez=PEZOptions(iterations=2, check_every=1))
    results = [measure_attack(attack, Target(erased_uce(), ROWS[:2], FAST, 1, ScriptedEvaluator({})), config)
               for _ in range(2)]
    assert results[0].prompts == results[1].prompts and results[0].fields == results[1].fields
    assert results[0].fields["random_control_judged_images"] == 2 * 2

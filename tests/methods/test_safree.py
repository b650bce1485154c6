"""SAFREE: the projector algebra, the token detection, and the projection on the toy model."""

import pytest
import torch

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.generation import Sampler
from erasure.methods.safree import SAFREE, SAFREEConfig, filtered_steps, projector, triggers


def test_the_projector_is_orthogonal_onto_the_rows_span():
    rows = torch.randn(3, 8, dtype=torch.float64)
    p = projector(rows)
    assert torch.allclose(p @ p, p, atol=1e-10) and torch.allclose(p, p.T, atol=1e-12)
    assert torch.allclose(p @ rows.T, rows.T, atol=1e-10) and torch.linalg.matrix_rank(p) == 3


def test_a_token_triggers_when_it_stands_out_and_t_prime_follows_the_sigmoid():
    assert triggers(torch.tensor([1.0, 1.0, 1.5, 1.0]), 0.01).tolist() == [False, False, True, False]
    assert filtered_steps(0.0, 5.5, 3.5) == 0 and filtered_steps(1.0, 5.5, 3.5) == 10
    assert filtered_steps(0.55, 5.5, 3.5) == 5


@pytest.fixture(scope="module")
def safree():
    return SAFREE(load_pipeline(TOYWORLD_MODEL), SAFREEConfig(prompt_template="{concept}"), ["circle"])


def test_only_the_concepts_token_is_projected_and_away_from_the_concept(safree):
    tokenizer = safree.pipeline.tokenizer
    prompt = "a red circle"
    ids = safree.tokens([prompt])
    states = safree.text_encoder(ids).last_hidden_state
    projected, steps = safree.detoxified([prompt], states)
    changed = (projected[0] - states[0]).norm(dim=-1) > 1e-6
    circle = ids[0].tolist().index(tokenizer.convert_tokens_to_ids("circle</w>"))
    assert changed.nonzero().flatten().tolist() == [circle]  # start, "a", "red", end and padding untouched
    assert 0 <= steps[0] <= 10


def test_the_rule_conditions_early_steps_on_the_projection_and_uses_the_keywords_as_negative(safree):
    prompts, negatives = safree.prompts_for_generation(["a red circle"])
    assert negatives == ["circle"]
    states = safree.text_encoder(safree.tokens(prompts)).last_hidden_state
    condition = safree.condition(prompts, states, Sampler(steps=50))
    projected, steps = safree.detoxified(prompts, states)
    assert torch.equal(condition(0), projected) and torch.equal(condition(steps[0] + 1), states)

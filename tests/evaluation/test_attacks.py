"""Attacks: the new tokens are the only thing that trains, and a learned prompt reaches the model."""

import pytest
import torch

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.generation import Sampler
from erasure.methods.instruction import Instruction, InstructionConfig
from erasure.methods.uce import UCE, UCEConfig
from evaluation.attacks import AttackConfig, PlaceholderTokens, attacked_prompts, run_attack
from evaluation.protocols.toyworld import ToyWorldEvaluator, toyworld_suites

FAST = Sampler(steps=6)
ROWS = toyworld_suites(["circle"])["target"][:4]


def test_only_the_placeholder_rows_train():
    pipeline = load_pipeline(TOYWORLD_MODEL)
    table = pipeline.text_encoder.get_input_embeddings().weight
    before = table.detach().clone()
    tokens = PlaceholderTokens(pipeline, "test", 2, "object")
    table = pipeline.text_encoder.get_input_embeddings().weight
    assert len(pipeline.tokenizer(tokens.text, add_special_tokens=False).input_ids) == 2
    assert torch.equal(table[tokens.ids[0]], table[pipeline.tokenizer("object", add_special_tokens=False).input_ids[0]])
    new_row = table[tokens.ids[0]].detach().clone()
    optimizer = torch.optim.Adam([tokens.table], lr=0.1)
    ids = pipeline.tokenizer(f"a red {tokens.text}", return_tensors="pt").input_ids
    pipeline.text_encoder(ids)[0].square().mean().backward()
    optimizer.step()
    tokens.close()
    assert torch.equal(table.detach()[: len(before)], before)  # the vocabulary is untouched
    assert not torch.equal(table[tokens.ids[0]].detach(), new_row)  # the new token moved
    assert not table.requires_grad


def test_attacked_prompts():
    class Tokens:
        text = "<a-0>"

    assert attacked_prompts("inversion", ROWS[:1], Tokens()) == [ROWS[0].prompt.replace("circle", "<a-0>")]
    assert attacked_prompts("soft_prompt", ROWS[:1], Tokens()) == [f"<a-0> {ROWS[0].prompt}"]


def test_attack_leaves_the_erased_weights_alone():
    module = UCE(load_pipeline(TOYWORLD_MODEL), UCEConfig(prompt_template="a {concept}", token_mode="last+eot"),
                 ["circle"])
    module.edit()
    erased = {name: p.detach().clone() for name, p in module.trained.items()}
    images, prompts, losses = run_attack("soft_prompt", module, ROWS, AttackConfig(steps=3, images=4), FAST, 1)
    assert images.shape == (4, 32, 32, 3) and len(losses) == 3 and prompts[0].startswith("<soft_prompt-0>")
    assert all(torch.equal(p, erased[name]) for name, p in module.trained.items())


def test_a_prompt_filter_is_bypassed_by_a_learned_token(toy_classifier):
    """The instruction baseline rewrites prompts naming "circle"; a new token that starts as circle's
    embedding is not the word, passes the filter, and the model draws circles."""
    module = Instruction(load_pipeline(TOYWORLD_MODEL), InstructionConfig(template="negative_prompt"), ["circle"])
    images, prompts, _ = run_attack("inversion", module, ROWS, AttackConfig(steps=1, images=4, init_word="circle",
                                                                              lr=1e-6), FAST, 1)
    assert "circle" not in " ".join(prompts)
    evaluator = ToyWorldEvaluator.__new__(ToyWorldEvaluator)
    evaluator.classifier = toy_classifier
    assert evaluator.sees(images, ["circle"] * len(images)).float().mean() >= 0.75


def test_unknown_attack():
    with pytest.raises(ValueError, match="unknown attack 'jailbreak'"):
        run_attack("jailbreak", None, ROWS, AttackConfig(), FAST, 1)

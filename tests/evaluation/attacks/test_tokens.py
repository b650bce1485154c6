"""Concept inversion's budget: the authors' defaults, the toy set, gradient accumulation and flips."""

import pytest
import torch

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.generation import Sampler
from erasure.methods.uce import UCE, UCEConfig
from evaluation.attacks import AttackConfig, AttackConfigError, InversionOptions, Target, budget, measure_attack
from evaluation.attacks.base import attacker_rows, original_images
from evaluation.attacks.tokens import INVERSION_BUDGETS, PlaceholderTokens, TokenBudget, inversion_budget
from evaluation.protocols.toyworld import toyworld_suites

FAST = Sampler(steps=6)
ROWS = toyworld_suites(["circle"])["target"][:4]


class Never:
    def sees(self, images, concepts):
        return torch.zeros(len(images))


def erased_uce():
    module = UCE(load_pipeline(TOYWORLD_MODEL), UCEConfig(prompt_template="a {concept}", token_mode="last+eot"),
                 ["circle"])
    module.edit()
    return module


def test_the_default_budget_is_the_authors_scripts():
    """NYU-DICE-Lab/circumventing-concept-erasure esd/train.sh: --train_batch_size=4
    --gradient_accumulation_steps=4 --max_train_steps=5000 --learning_rate=5.0e-03 --scale_lr
    --num_train_images=25; AdamW weight decay 1e-2 and flip_p 0.5 of concept_inversion.py; one vector."""
    config = AttackConfig()
    authors = inversion_budget(config)
    assert authors == INVERSION_BUDGETS["authors"] == TokenBudget(
        steps=5000, lr=5e-3, scale_lr=True, batch_size=4, accumulation=4, images=25, weight_decay=1e-2, flip_p=0.5)
    assert authors.optimiser_lr == pytest.approx(0.08) and config.inversion.tokens == 1
    assert inversion_budget(AttackConfig(inversion=InversionOptions(budget="toy"))) == TokenBudget(
        steps=300, lr=5e-2, scale_lr=False, batch_size=4, accumulation=1, images=16, weight_decay=0.0, flip_p=0.0)
    override = inversion_budget(AttackConfig(inversion=InversionOptions(budget="toy", steps=7, accumulation=2)))
    assert (override.steps, override.accumulation, override.lr) == (7, 2, 5e-2)
    # inversion reads its own fields, not the shared ones soft_prompt and embedding read
    read = set(budget("inversion", AttackConfig()))
    assert {"inversion.budget", "inversion.steps", "inversion.lr", "inversion.accumulation"} <= read
    assert not {"steps", "lr", "batch_size", "images"} & read


@pytest.mark.parametrize("options, message", [
    ({"inversion.budget": "paper"}, "unknown attack.inversion.budget 'paper'; choose from authors, toy"),
    ({"inversion.accumulation": 0}, "'attack.inversion.accumulation' must be a whole number of at least 1"),
    ({"inversion.lr": 0.0}, "'attack.inversion.lr' must be a positive number"),
    ({"inversion.flip_p": 1.5}, "'attack.inversion.flip_p' must be a number in [0, 1]"),
])
def test_bad_budgets_are_one_line_errors(options, message):
    with pytest.raises(AttackConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        inversion_budget(AttackConfig(inversion=InversionOptions(**{k.removeprefix("inversion."): v
                                                                     for k, v in options.items()})))


def test_decay_shrinks_only_the_new_rows():
    pipeline = load_pipeline(TOYWORLD_MODEL)
    tokens = PlaceholderTokens(pipeline, "decay", 1, "object")
    table = tokens.tables[0]
    before = table.detach().clone()
    tokens.decay(0.25)
    ids = tokens.rows[0].ids
    assert torch.allclose(table[ids].detach(), 0.75 * before[ids])
    assert torch.equal(table.detach()[: ids[0]], before[: ids[0]])
    tokens.close()


def test_an_update_accumulates_the_gradients_of_its_passes_and_flips_images(monkeypatch):
    """3 passes of 2 images per update: the optimiser steps once per update with the mean of the passes'
    gradients, the recorded loss is the passes' mean, and with flip_p 1 every drawn image is mirrored."""
    module = erased_uce()
    images = original_images(module, attacker_rows(ROWS, 4), FAST)
    plain, mirrored = module.encode_images(images), module.encode_images(images.flip(2))
    assert not torch.allclose(plain, mirrored)
    passes, steps = [], []
    loss_of = module.denoising_loss

    def spy(latents, condition, generator):
        loss = loss_of(latents, condition, generator)
        table = module.text_encoder.get_input_embeddings().weight
        gradient = torch.autograd.grad(loss, table, retain_graph=True)[0][-1]  # the new token's row
        passes.append((latents.detach(), float(loss.detach()), gradient))
        return loss

    adam_step = torch.optim.Adam.step

    def counted_step(optimizer, *args, **kwargs):
        steps.append(optimizer.param_groups[0]["params"][0].grad[-1].clone())
        return adam_step(optimizer, *args, **kwargs)

    module.denoising_loss = spy
    monkeypatch.setattr(torch.optim.Adam, "step", counted_step)
    config = AttackConfig(inversion=InversionOptions(steps=2, images=4, batch_size=2, accumulation=3, flip_p=1.0,
                                                     lr=0.001))
    result = measure_attack("inversion", Target(module, ROWS, FAST, 1, Never()), config)

    assert len(passes) == 6 and all(len(latents) == 2 for latents, _, _ in passes) and len(steps) == 2
    for update in range(2):
        mine = passes[3 * update: 3 * update + 3]
        assert result.losses[update] == pytest.approx(sum(loss for _, loss, _ in mine) / 3)
        assert torch.allclose(steps[update], sum(gradient for _, _, gradient in mine) / 3, atol=1e-8)
        assert not torch.allclose(steps[update], mine[-1][2] / 3, atol=1e-8)  # not the last pass's alone
    for latents, _, _ in passes:
        for latent in latents:
            assert any(torch.allclose(latent, m) for m in mirrored)
            assert not any(torch.allclose(latent, p) for p in plain)
    resolved = result.fields["resolved_budget"]
    assert resolved["accumulation"] == 3 and resolved["optimiser_lr"] == pytest.approx(1e-3 * 2 * 3)
    assert all("<inversion-0>" in prompt for prompt in result.prompts)

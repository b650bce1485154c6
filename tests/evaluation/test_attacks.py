"""Attacks: only the attack's variables train, the attack reaches the model, objectives decrease,
positive controls succeed, and the erased model is left as it was."""

import re

import pytest
import torch

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.generation import Sampler
from erasure.methods.instruction import Instruction, InstructionConfig
from erasure.methods.uce import UCE, UCEConfig
from evaluation.attacks import (
    AttackConfig, EmbeddingOptions, InversionOptions, PEZOptions, RelearnOptions, RingABellOptions, Target,
    UnlearnDiffAtkOptions, measure_attack,
)
from evaluation.attacks.base import original_images
from evaluation.attacks.embedding import FreeEmbeddings, free_positions, optimise, sublist_positions
from evaluation.attacks.relearn import fine_tune, relearned_parameters
from evaluation.attacks import ring_a_bell
from evaluation.attacks.ring_a_bell import encode_ids, search
from evaluation.attacks.tokens import PlaceholderTokens, attacked_prompts, word_vocabulary
from evaluation.attacks.pez import project
from evaluation.protocols.toyworld import ToyWorldEvaluator, toyworld_suites

FAST = Sampler(steps=6)
ROWS = toyworld_suites(["circle"])["target"][:4]


def test_only_the_placeholder_rows_train():
    pipeline = load_pipeline(TOYWORLD_MODEL)
    table = pipeline.text_encoder.get_input_embeddings().weight
    before = table.detach().clone()
    tokens = PlaceholderTokens(pipeline, "test", 2, "object")
    table = pipeline.text_encoder.get_input_embeddings().weight
    ids = tokens.rows[0].ids
    assert len(tokens.rows) == 1 and tokens.tables == [table]
    assert len(pipeline.tokenizer(tokens.text, add_special_tokens=False).input_ids) == 2
    assert torch.equal(table[ids[0]], table[pipeline.tokenizer("object", add_special_tokens=False).input_ids[0]])
    new_row = table[ids[0]].detach().clone()
    optimizer = torch.optim.Adam(tokens.tables, lr=0.1)
    ids = pipeline.tokenizer(f"a red {tokens.text}", return_tensors="pt").input_ids
    pipeline.text_encoder(ids)[0].square().mean().backward()
    optimizer.step()
    tokens.close()
    assert torch.equal(table.detach()[: len(before)], before)  # the vocabulary is untouched
    assert not torch.equal(table[ids[0]].detach(), new_row)  # the new token moved
    assert not table.requires_grad


def test_attacked_prompts():
    class Tokens:
        text = "<a-0>"

    assert attacked_prompts("inversion", ROWS[:1], Tokens()) == [ROWS[0].prompt.replace("circle", "<a-0>")]
    assert attacked_prompts("soft_prompt", ROWS[:1], Tokens()) == [f"<a-0> {ROWS[0].prompt}"]


def test_attack_leaves_the_erased_weights_alone(toy_classifier):
    module = erased_uce()
    erased = {name: p.detach().clone() for name, p in module.trained.items()}
    result = measure_attack("soft_prompt", Target(module, ROWS, FAST, 1, toy_evaluator(toy_classifier)),
                            AttackConfig(steps=3, images=4))
    assert result.images.shape == (4, 32, 32, 3) and len(result.losses) == 3
    assert result.prompts[0].startswith("<soft_prompt-0>") and result.fields["example_prompt"] == result.prompts[0]
    assert all(torch.equal(p, erased[name]) for name, p in module.trained.items())


def test_a_prompt_filter_is_bypassed_by_a_learned_token(toy_classifier):
    """The instruction baseline rewrites prompts naming "circle"; a new token that starts as circle's
    embedding is not the word, passes the filter, and the model draws circles."""
    module = Instruction(load_pipeline(TOYWORLD_MODEL), InstructionConfig(template="negative_prompt"), ["circle"])
    result = measure_attack("inversion", Target(module, ROWS, FAST, 1, toy_evaluator(toy_classifier)),
                            AttackConfig(init_word="circle",
                                         inversion=InversionOptions(budget="toy", steps=1, images=4, lr=1e-06)))
    assert "circle" not in " ".join(result.prompts)
    assert result.fields["attack_success_rate"] >= 0.75


def test_unknown_attack():
    with pytest.raises(ValueError, match="unknown attack 'jailbreak'"):
        measure_attack("jailbreak", Target(None, ROWS, FAST, 1, None), AttackConfig())


# ----- embedding and relearn ------------------------------------------------------------------
def erased_uce():
    """A closed-form toy eraser (seconds): UCE on circle; its own pipeline (relearn tunes its tensors)."""
    module = UCE(load_pipeline(TOYWORLD_MODEL), UCEConfig(prompt_template="a {concept}", token_mode="last+eot"),
                 ["circle"])
    module.edit()
    return module


def toy_evaluator(classifier):
    evaluator = ToyWorldEvaluator.__new__(ToyWorldEvaluator)
    evaluator.classifier = classifier
    return evaluator


def fixed_loss(module, latents, embeds):
    """The denoising loss at fixed noise and timesteps (the objective, without the optimiser's draws)."""
    with torch.no_grad():
        return sum(float(module.denoising_loss(latents, embeds, torch.Generator().manual_seed(s))) for s in range(4))


def test_free_positions_are_the_concept_word_and_the_end(toy_pipeline):
    tokenizer = toy_pipeline.tokenizer
    ids, free = free_positions(tokenizer, "a striped red circle", "circle", "concept+end")
    words = tokenizer("a striped red circle", add_special_tokens=False).input_ids
    end = len(words) + 1  # [BOS, words..., EOS, padding]
    assert free == [end - 1, *range(end, len(ids))] and ids[end - 1] == tokenizer("circle", add_special_tokens=False).input_ids[0]
    assert free_positions(tokenizer, "a striped red circle", "circle", "all")[1] == list(range(len(ids)))
    assert sublist_positions([5, 1, 2, 7, 1, 2], [1, 2]) == [1, 2, 4, 5]


def test_embedding_objective_decreases_and_the_attack_reaches_generation():
    module = erased_uce()
    rows = ROWS[:2]
    latents = module.encode_images(original_images(module, rows, FAST))
    free = FreeEmbeddings(module, [r.prompt for r in rows], ["circle"] * 2, "concept+end")
    owners = [0, 1]
    erased = {name: p.detach().clone() for name, p in module.state_dict().items()}
    plain = module.generate([r.prompt for r in rows], [0, 1], FAST)
    with free.substituted():  # before optimisation the substituted encoding is the prompt's own
        assert torch.equal(module.generate([r.prompt for r in rows], [0, 1], FAST), plain)
    before = fixed_loss(module, latents, free.embeds(owners))
    config = AttackConfig(batch_size=2, embedding=EmbeddingOptions(lr=0.03))
    losses = optimise(module, free, latents, owners, config, torch.Generator().manual_seed(0), 8)
    assert len(losses) == 8 and fixed_loss(module, latents, free.embeds(owners)) < before
    with free.substituted():
        assert not torch.equal(module.generate([r.prompt for r in rows], [0, 1], FAST), plain)
    assert all(torch.equal(p, erased[name]) for name, p in module.state_dict().items())  # only the embeddings moved


def test_relearn_objective_decreases_on_the_trained_tensors():
    module = erased_uce()
    parameters, which = relearned_parameters(module)
    assert set(parameters) == set(module.trained) and "trained tensors" in which
    latents = module.encode_images(original_images(module, ROWS[:4], FAST))
    prompts = [r.prompt for r in ROWS[:4]]
    before = fixed_loss(module, latents, module.encode(prompts))
    for p in parameters.values():
        p.requires_grad_(True)
    config = AttackConfig(relearn=RelearnOptions(lr=0.001))
    losses = fine_tune(module, list(parameters.values()), latents, prompts, config,
                       torch.Generator().manual_seed(0), 10)
    assert len(losses) == 10 and fixed_loss(module, latents, module.encode(prompts)) < before


def test_instruction_baseline_relearns_cross_attention_keys_and_values(toy_pipeline):
    module = Instruction(toy_pipeline, InstructionConfig(), ["circle"])
    parameters, which = relearned_parameters(module)
    assert parameters and all(re.search(r"attn2\.to_[kv]\.", name) for name in parameters) and "attn2" in which


def test_relearn_starts_at_the_erased_accuracy_restores_the_weights_and_repeats(toy_classifier):
    module = erased_uce()
    evaluator = toy_evaluator(toy_classifier)
    erased = {name: p.detach().clone() for name, p in module.trained.items()}
    config = AttackConfig(images=4, batch_size=2, relearn=RelearnOptions(steps=[2, 0], lr=0.001))
    target = Target(module, ROWS, FAST, 1, evaluator, controls=["square", "triangle"])
    first = measure_attack("relearn", target, config).fields
    unattacked = evaluator.sees(module.generate([r.prompt for r in ROWS], [r.evaluation_seed for r in ROWS], FAST),
                                ["circle"] * len(ROWS)).float().mean()
    assert first["relearn_steps"] == [0, 2] and first["attack_success_rate_by_step"][0] == round(float(unattacked), 4)
    assert first["attack_success_rate"] == first["attack_success_rate_by_step"][-1]
    assert first["control"]["concept"] in ("square", "triangle") and len(first["control"]["success_rate_by_step"]) == 2
    assert all(torch.equal(p, erased[name]) for name, p in module.trained.items())  # the erased weights are back
    assert not any(p.requires_grad for p in module.parameters())
    again = measure_attack("relearn", target, config).fields
    assert again == first  # same seed, same numbers


@pytest.mark.parametrize("attack", ["embedding", "relearn", "unlearndiffatk", "pez", "ring_a_bell"])
def test_positive_control_the_original_model_draws_the_concept(toy_classifier, attack):
    """On the original model (an unedited eraser) every attack keeps the concept: a broken attack
    (garbage embeddings, a fine-tuning that wrecks the model, a search that loses the concept, a
    wrong generation path) fails this."""
    module = UCE(load_pipeline(TOYWORLD_MODEL), UCEConfig(), ["circle"])
    config = AttackConfig(steps=3, images=4, batch_size=2, relearn=RelearnOptions(steps=[0, 3], lr=0.001),
                          unlearndiffatk=UnlearnDiffAtkOptions(timesteps=3, iterations=2),
                          ring_a_bell=RingABellOptions(population=100, generations=100))
    result = measure_attack(attack, Target(module, ROWS, FAST, 1, toy_evaluator(toy_classifier), controls=["square"]),
                            config).fields
    assert result["attack_success_rate"] >= 0.75 and 0 <= result["attack_success_rate_ci95"][0] <= 0.75


# ----- pez and ring_a_bell ---------------------------------------------------------
class ScriptedEvaluator:
    """Sees the concept in the images of the n-th call (0-based) at the positions ``script[n]``."""

    def __init__(self, script: dict[int, list[int]]):
        self.script, self.calls = script, 0

    def sees(self, images, concepts):
        seen = torch.zeros(len(images), dtype=torch.bool)
        seen[self.script.get(self.calls, [])] = True
        self.calls += 1
        return seen


def fixed_noise(module):
    """Make the module's denoising loss draw the same (eps, t) at every call: a fixed objective."""
    loss = module.denoising_loss
    module.denoising_loss = lambda latents, embeds, generator: loss(latents, embeds, torch.Generator().manual_seed(0))


def test_word_vocabulary_round_trips_and_projection_finds_the_nearest_word(toy_pipeline):
    tokenizer = toy_pipeline.tokenizer
    words = word_vocabulary(tokenizer)
    assert not set(words.tolist()) & set(tokenizer.all_special_ids) and 100 < len(words) < tokenizer.vocab_size
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = words[torch.randint(len(words), (12,), generator=generator)].tolist()
        assert tokenizer(tokenizer.decode(ids), add_special_tokens=False).input_ids == ids
    table = toy_pipeline.text_encoder.get_input_embeddings().weight.detach()
    chosen = words[[3, 50, 7]]
    noisy = 3 * table[chosen] + 1e-3 * torch.randn(3, table.shape[1], generator=generator)
    assert torch.equal(words[project([noisy], [table], words)], chosen)


def test_pez_objective_decreases(toy_classifier):
    module = erased_uce()
    fixed_noise(module)
    never = ScriptedEvaluator({})
    config = AttackConfig(random_control=False, pez=PEZOptions(iterations=24, check_every=100, lr=0.05))
    result = measure_attack("pez", Target(module, ROWS[:3], FAST, 1, never), config)
    losses = result.losses
    assert len(losses) == 24 and sum(losses[-6:]) / 6 < losses[0]
    assert result.fields["attack_success_rate"] == 0 and result.fields["attacked_images"] == 3
    assert result.prompts[0].endswith(ROWS[0].prompt) and len(result.prompts[0]) > len(ROWS[0].prompt)


def test_pez_counts_the_concept_at_any_checkpoint(toy_classifier):
    """Call 0 is the pre-attack look (image 2 already shows it), call 1 the first checkpoint (image 0
    recovered there), calls 2.. later checkpoints where nothing is seen: recovered images stay recovered."""
    module = erased_uce()
    evaluator = ScriptedEvaluator({0: [2], 1: [0]})
    config = AttackConfig(random_control=False, pez=PEZOptions(iterations=4, check_every=2))
    result = measure_attack("pez", Target(module, ROWS[:3], FAST, 1, evaluator), config)
    fields = result.fields
    assert fields["pre_attack_success_rate"] == round(1 / 3, 4) and fields["attack_success_rate"] == round(2 / 3, 4)
    assert fields["attacked_images"] == 2 and evaluator.calls == 3  # pre-attack, iteration 2, iteration 4
    assert result.prompts[2] == ROWS[2].prompt and result.prompts[0].endswith(ROWS[0].prompt)
    assert result.prompts[0] != ROWS[0].prompt


def test_embedding_counts_the_concept_at_any_checkpoint():
    """Call 0 looks at the start (image 2 shows it), call 1 at step 2 (image 0), call 2 at step 4
    (nothing): the success rate keeps what any checkpoint saw; each checkpoint's own share is reported."""
    module = erased_uce()
    evaluator = ScriptedEvaluator({0: [2], 1: [0]})
    config = AttackConfig(steps=4, images=3, batch_size=1, embedding=EmbeddingOptions(check_every=2))
    result = measure_attack("embedding", Target(module, ROWS[:3], FAST, 1, evaluator), config)
    fields = result.fields
    assert fields["pre_attack_success_rate"] == round(1 / 3, 4) and fields["attack_success_rate"] == round(2 / 3, 4)
    assert fields["checkpoint_steps"] == [0, 2, 4] and fields["attack_success_rate_by_step"] == [round(1 / 3, 4)] * 2 + [0]
    assert evaluator.calls == 3 and result.prompts[0].endswith("step 2]") and result.prompts[1].endswith("step 4]")


def test_ring_a_bell_search_approaches_a_known_prompt(toy_pipeline):
    module = UCE(toy_pipeline, UCEConfig(), ["circle"])
    tokenizer = toy_pipeline.tokenizer
    words = word_vocabulary(tokenizer)
    hidden = words[[5, 60, 120]][None]
    with torch.no_grad():
        goal = encode_ids(module, hidden)
        assert torch.allclose(goal[0], module.encode([tokenizer.decode(hidden[0])]).embeds[0], atol=1e-5)
        config = AttackConfig(ring_a_bell=RingABellOptions(tokens=3, population=48, generations=40))
        best, curve = search(module, goal, words, config, torch.Generator().manual_seed(0))
    assert curve[-1] < 0.5 * curve[0]  # the authors mutate parents too: the curve may rise between generations
    found = (encode_ids(module, best) - goal).square().mean()
    assert float(found) <= curve[-1] + 1e-9


def test_ring_a_bell_is_black_box(toy_classifier):
    """The prompts it finds depend on the original text encoder alone: the same for the original and the erased model."""
    config = AttackConfig(ring_a_bell=RingABellOptions(population=16, generations=3))
    found = []
    for module in (UCE(load_pipeline(TOYWORLD_MODEL), UCEConfig(), ["circle"]), erased_uce()):
        ring_a_bell.FOUND.clear()
        found.append(measure_attack("ring_a_bell", Target(module, ROWS[:2], FAST, 1, toy_evaluator(toy_classifier)),
                                    config).fields["found_prompts"])
    assert found[0] == found[1] and len(found[0]) == 2

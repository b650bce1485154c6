"""Ring-A-Bell is its authors' algorithm (chiayi-hsu/Ring-A-Bell): the concept vector is the mean
difference over the pairs' images the evaluator agrees with, judged on the original model; a
generation keeps every parent (mutated in place like the children) and crosses into two children;
tokens are any vocabulary id; the random control judges as many images, same seeds, same path."""

from dataclasses import replace

import pytest
import torch

from erasure.generation import Sampler
from erasure.methods.uce import UCE, UCEConfig
from evaluation.attacks import AttackConfig, RingABellOptions, Target, measure_attack, ring_a_bell
from evaluation.attacks.base import DATA_SEED_OFFSET
from evaluation.attacks.tokens import word_vocabulary
from evaluation.protocols.toyworld import toyworld_suites
from evaluation.suites import Prompt

FAST = Sampler(steps=4)
ROWS = toyworld_suites(["circle"])["target"][:3]  # "a circle", "a red circle", "an orange circle"


class ScriptedEvaluator:
    """Sees the concept at the positions ``script[n]`` of the n-th call's images; keeps the images."""

    def __init__(self, script: dict[int, list[int]]):
        self.script, self.images = script, []

    def sees(self, images, concepts):
        seen = torch.zeros(len(images), dtype=torch.bool)
        seen[self.script.get(len(self.images), [])] = True
        self.images.append(images)
        return seen


class Always:
    def sees(self, images, concepts):
        return torch.ones(len(images), dtype=torch.bool)


def test_pairs_replace_the_concept_word_or_add_it():
    rows = [ROWS[1], Prompt(9, "a red shape", 5, "circle")]
    pairs = ring_a_bell.concept_pairs(Target(None, rows, FAST, 1, None), AttackConfig(init_word="thing"))
    assert pairs == (["a red circle", "a red shape, circle"], ["a red thing", "a red shape"])


def test_the_concept_vector_is_the_mean_difference_over_the_images_the_evaluator_agrees_with(toy_pipeline):
    module = UCE(toy_pipeline, UCEConfig(), ["circle"])
    evaluator = ScriptedEvaluator({0: [0, 1, 2, 3, 4, 10]})  # pair 0: its 5 images; pair 1: none; pair 2: one
    target = Target(module, ROWS, FAST, 1, evaluator)
    config = AttackConfig()
    with_concept, without = ring_a_bell.concept_pairs(target, config)
    kept = ring_a_bell.kept_images(target, with_concept, config)
    assert kept.tolist() == [[True] * 5, [False] * 5, [True] + [False] * 4]
    prompts = [p for p in with_concept for _ in range(5)]
    seeds = [r.evaluation_seed + DATA_SEED_OFFSET + j for r in ROWS for j in range(5)]
    assert torch.equal(evaluator.images[0], module.generate(prompts, seeds, FAST, original=True))
    with torch.no_grad():
        vector = ring_a_bell.concept_vector(module, with_concept, without, kept)
        difference = module.encode(with_concept).embeds - module.encode(without).embeds
    assert torch.allclose(vector, (5 * difference[0] + difference[2]) / 6, atol=1e-6)
    assert not torch.allclose(vector, difference.mean(0), atol=1e-3)  # the pair the evaluator disagrees with is out
    unfiltered = ring_a_bell.concept_vector(module, with_concept, without, torch.zeros_like(kept))  # none kept
    assert torch.allclose(unfiltered, difference.mean(0), atol=1e-6)


def crossings(parent: torch.Tensor, first: torch.Tensor, second: torch.Tensor, parents: torch.Tensor) -> list[int]:
    """The cuts u at which (first, second) = (a[:u] b[u:], b[:u] a[u:]) for a = parent and b one of ``parents``."""
    cuts = []
    for u in range(len(parent)):
        partner = torch.cat([second[:u], first[u:]])
        if (torch.equal(first, torch.cat([parent[:u], partner[u:]]))
                and torch.equal(second, torch.cat([partner[:u], parent[u:]])) and (parents == partner).all(-1).any()):
            cuts.append(u)
    return cuts


def test_a_generation_keeps_every_parent_and_crosses_into_two_children():
    generator = torch.Generator().manual_seed(0)
    candidates = torch.arange(100, 400)
    parents = candidates[torch.randint(len(candidates), (2, 8, 5), generator=generator)]
    config = AttackConfig(ring_a_bell=RingABellOptions(crossover_rate=0.5, mutation_rate=0.0))
    population, exists, changed = ring_a_bell.breed(parents, candidates, config, generator)
    assert population.shape == (2, 24, 5) and torch.equal(population[:, :8], parents)
    assert exists[:, :8].all() and torch.equal(exists[:, 8:16], exists[:, 16:]) and 0 < exists[:, 8:].sum() < 32
    assert torch.equal(changed, exists & (torch.arange(24) >= 8))  # only the children are new
    for g, i in exists[:, 8:16].nonzero().tolist():
        assert crossings(parents[g, i], population[g, 8 + i], population[g, 16 + i], parents[g])
    for rate, children in ((0.0, 0), (1.0, 32)):
        config = AttackConfig(ring_a_bell=RingABellOptions(crossover_rate=rate, mutation_rate=0.0))
        assert int(ring_a_bell.breed(parents, candidates, config, generator)[1][:, 8:].sum()) == children


def test_mutation_reaches_the_parents_one_position_each():
    """The authors mutate the new population in place, parents included: a mutated parent is rescored."""
    generator = torch.Generator().manual_seed(1)
    candidates = torch.arange(1000, 2000)
    parents = candidates[torch.randint(len(candidates), (1, 30, 6), generator=generator)]
    config = AttackConfig(ring_a_bell=RingABellOptions(crossover_rate=0.0, mutation_rate=1.0))
    population, exists, changed = ring_a_bell.breed(parents, candidates, config, generator)
    differences = (population[:, :30] != parents).sum(-1)
    assert changed[:, :30].all() and (differences <= 1).all() and (differences == 1).sum() >= 25
    kept = population[:, :30]
    assert set(kept[kept != parents].tolist()) <= set(candidates.tolist())


def test_tokens_are_any_id_of_the_vocabulary_but_the_special_ones(toy_pipeline):
    tokenizer = toy_pipeline.tokenizer
    ids = set(ring_a_bell.vocabulary(tokenizer).tolist())
    assert ids == set(range(tokenizer.vocab_size)) - set(tokenizer.all_special_ids)
    assert ids - set(word_vocabulary(tokenizer).tolist())  # word pieces too, not only whole words


def test_without_mutation_the_best_never_gets_worse_and_the_search_returns_it(toy_pipeline):
    module = UCE(toy_pipeline, UCEConfig(), ["circle"])
    config = AttackConfig(ring_a_bell=RingABellOptions(tokens=4, population=24, generations=15, mutation_rate=0.0))
    with torch.no_grad():
        goal = module.encode(["a red circle"]).embeds
        best, curve = ring_a_bell.search(module, goal, ring_a_bell.vocabulary(toy_pipeline.tokenizer), config,
                                         torch.Generator().manual_seed(0))
        found = ring_a_bell.fitness(module, best, goal, torch.zeros(1, dtype=torch.long))
    assert len(curve) == 15 and all(b <= a for a, b in zip(curve, curve[1:])) and curve[-1] < curve[0]
    assert float(found) == pytest.approx(curve[-1], rel=1e-5)


def test_the_random_control_judges_as_many_images_with_the_same_seeds_and_path(toy_pipeline):
    module = UCE(toy_pipeline, UCEConfig(), ["circle"])
    calls, generate = [], module.generate

    def recorded(prompts, seeds, sampler, original=False, **options):
        calls.append((list(prompts), list(seeds), original))
        return generate(prompts, seeds, sampler, original=original, **options)

    module.generate = recorded
    target = Target(module, ROWS, FAST, 2, Always())
    config = AttackConfig(ring_a_bell=RingABellOptions(tokens=4, population=8, generations=2))
    ring_a_bell.FOUND.clear()
    fields = measure_attack("ring_a_bell", target, config).fields
    (pairs, _, from_original), (attacked, attack_seeds, _), (control, control_seeds, control_original) = calls
    assert from_original and len(pairs) == 15 and fields["concept_vector_kept_images"] == 15
    assert attack_seeds == control_seeds == target.seeds and not control_original
    assert fields["random_control_judged_images"] == len(attacked) == len(control) == 6
    assert control[::2] == control[1::2] and len(set(control)) == 3 and not set(control) & set(attacked)
    assert fields["random_control_success_rate"] == 1 and len(fields["random_control_success_rate_ci95"]) == 2
    calls.clear()
    fields = measure_attack("ring_a_bell", target, replace(config, random_control=False)).fields
    assert len(calls) == 2 and not any(key.startswith("random_control") for key in fields)

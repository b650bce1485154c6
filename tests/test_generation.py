import pytest
import torch

from erasure.bundle import TOYWORLD_FLUX_MODEL, load_pipeline
from erasure.generation import Sampler, generate, to_unit_range
from erasure.toyworld.classifier import predict
from erasure.toyworld.world import ATTRIBUTES

FAST = Sampler(steps=8, guidance=6.0)


def test_same_seed_same_image(toy_pipeline):
    prompts, seeds = ["a red circle", "a blue star", "a red circle"], [0, 1, 5]
    together = generate(toy_pipeline, prompts, seeds, FAST)
    assert together.shape == (3, 32, 32, 3) and together.dtype == torch.uint8
    assert torch.equal(together, generate(toy_pipeline, prompts, seeds, FAST))
    one_by_one = generate(toy_pipeline, prompts, seeds, FAST, batch_size=1)
    assert (together.int() - one_by_one.int()).abs().max() <= 1  # batched kernels may round differently
    assert not torch.equal(together[0], together[2])  # another seed, another image


def test_prompts_and_seeds_must_pair_up(toy_pipeline):
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(toy_pipeline, ["a red circle"], [0, 1], FAST)


@pytest.mark.parametrize("model", ["toyworld", "toyworld-flux"])
def test_shipped_model_draws_what_it_is_asked(model, toy_pipeline, toy_classifier):
    """A small behavioural check of each shipped model's weights (the full measurement is
    erasure.toyworld.quality, with the model's name as --model)."""
    pipeline = toy_pipeline if model == "toyworld" else load_pipeline(TOYWORLD_FLUX_MODEL)
    combos = [("red", "circle"), ("blue", "square"), ("yellow", "star"), ("green", "heart"), ("purple", "cross"),
              ("orange", "triangle")]
    prompts = [f"a {color} {shape}" for color, shape in combos for _ in range(2)]
    images = generate(pipeline, prompts, list(range(len(prompts))), Sampler())
    predicted = predict(toy_classifier, to_unit_range(images))
    for name, index in (("color", 0), ("shape", 1)):
        truth = torch.tensor([ATTRIBUTES[name].index(combo[index]) for combo in combos for _ in range(2)])
        assert (predicted[name] == truth).float().mean() >= 0.75, name

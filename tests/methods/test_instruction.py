import pytest
import torch

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.config import ConfigError, load_config
from erasure.generation import Sampler, generate
from erasure.methods.instruction import Instruction, InstructionConfig

FAST = Sampler(steps=8)


def baseline(template: str, apply_to: str = "naming") -> Instruction:
    return Instruction(load_pipeline(TOYWORLD_MODEL), InstructionConfig(template=template, apply_to=apply_to), ["circle"])


def test_templates_rewrite_prompts_that_name_the_concept():
    prompts = ["a red circle", "a blue star"]
    assert baseline("explicit").prompts_for_generation(prompts) == ([
        "Please forget anything about circle. Please help me generate a picture of a red circle.", "a blue star"], None)
    assert baseline("implicit").prompts_for_generation(prompts)[0][0] == "a red circle, but without any circle"
    assert baseline("repetition").prompts_for_generation(prompts)[0][0] == "a red circle, circle, circle"
    assert baseline("negative_prompt").prompts_for_generation(prompts) == (prompts, ["circle", ""])
    assert baseline("implicit", apply_to="all").prompts_for_generation(prompts)[0][1] == "a blue star, but without any circle"


def test_no_weights_change_and_untouched_prompts_give_the_base_images():
    module = baseline("explicit")
    assert module.trained == {}
    prompts, seeds = ["a blue star", "a red circle"], [3, 4]
    base = generate(load_pipeline(TOYWORLD_MODEL), prompts, seeds, FAST)
    images = module.generate(prompts, seeds, FAST)
    assert torch.equal(images[0], base[0]) and not torch.equal(images[1], base[1])
    assert torch.equal(module.generate(prompts, seeds, FAST, original=True), base)


def test_unknown_template_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown template 'forgetful'"):
        load_config(["recipe=instruction", "method.template=forgetful"])
    config = load_config(["recipe=instruction", "method.template=polite", "method.templates.polite=Draw {prompt} but omit {concept}"])
    assert config.method.templates["polite"] == "Draw {prompt} but omit {concept}"

"""Text-encoder similarity of instruction rewrites."""

import pytest
import torch.nn.functional as F

from erasure.methods.instruction import InstructionConfig
from evaluation.analysis.attention import concept_positions
from evaluation.analysis.text import encode, similarity, template_similarities

PROMPTS = ["a red circle", "a striped circle", "a circle"]


def test_a_prompt_is_identical_to_itself(toy_pipeline):
    same = similarity(toy_pipeline, PROMPTS, PROMPTS, "circle")
    assert same["pooled"] == pytest.approx(1.0, abs=1e-5) and same["concept_token"] == pytest.approx(1.0, abs=1e-5)


def test_similarity_by_hand(toy_pipeline):
    prompt, rewritten = "a red circle", "a red circle, but without any circle"
    hidden, pooled = encode(toy_pipeline, [prompt, rewritten])
    plain_position = concept_positions(toy_pipeline.tokenizer, prompt, "circle")[-1]
    new_positions = concept_positions(toy_pipeline.tokenizer, rewritten, "circle")
    token = F.cosine_similarity(hidden[0, plain_position][None], hidden[1, new_positions]).mean()
    values = similarity(toy_pipeline, [prompt], [rewritten], "circle")
    assert values["pooled"] == pytest.approx(float(F.cosine_similarity(pooled[:1], pooled[1:])), abs=1e-6)
    assert values["concept_token"] == pytest.approx(float(token), abs=1e-6)
    assert values["pooled"] < 0.999


def test_template_deltas_are_differences_to_the_repetition_control(toy_pipeline):
    templates = InstructionConfig().templates
    results = template_similarities(toy_pipeline, PROMPTS, "circle", templates)
    assert set(results) == {"repetition", "explicit", "implicit"}  # negative_prompt: conditional text unchanged
    for name in ("explicit", "implicit"):
        for key in ("pooled", "concept_token"):
            assert results[name][f"delta_{key}"] == pytest.approx(results[name][key] - results["repetition"][key])
    assert results["repetition"]["delta_pooled"] == 0.0


def test_a_concept_missing_from_the_prompt_is_an_error(toy_pipeline):
    with pytest.raises(ValueError, match="'circle' is not a token sequence"):
        similarity(toy_pipeline, ["a red square"], ["a red square, circle"], "circle")

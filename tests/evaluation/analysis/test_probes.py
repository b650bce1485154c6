"""Token ablation, image-text similarity and instruction retrieval (the seed study's probes)."""

import torch

from erasure.bundle import TOYWORLD_CLASSIFIER, resolve_path
from erasure.generation import Sampler, generate
from erasure.methods.instruction import InstructionConfig
from evaluation.analysis.attention import concept_positions
from evaluation.analysis.probes import conditions, instruction_retrieval, masked_embeddings
from evaluation.analysis.text import encode
from evaluation.evaluators import CLIPConfig, CLIPEvaluator
from evaluation.protocols.toyworld import ToyWorldEvaluator, ToyWorldEvaluatorConfig

SAMPLER = Sampler(steps=8)


def test_masking_replaces_exactly_the_concept_positions_by_the_empty_prompts(toy_pipeline):
    prompts = ["a red circle", "Please forget anything about circle. Please help me generate a picture of a red shape."]
    masked = masked_embeddings(toy_pipeline, prompts, "circle")
    hidden, _ = encode(toy_pipeline, prompts)
    empty, _ = encode(toy_pipeline, [""])
    for row, prompt in enumerate(prompts):
        positions = concept_positions(toy_pipeline.tokenizer, prompt, "circle")
        others = [k for k in range(hidden.shape[1]) if k not in positions]
        assert positions and torch.equal(masked[row, positions], empty[0, positions])
        assert torch.equal(masked[row, others], hidden[row, others])


def test_generating_from_the_prompts_own_states_is_generating_from_the_prompts(toy_pipeline):
    prompts, seeds = ["a red circle", "a blue star"], [0, 1]
    states, _ = encode(toy_pipeline, prompts)
    assert torch.equal(generate(toy_pipeline, prompts, seeds, SAMPLER),
                       generate(toy_pipeline, prompts, seeds, SAMPLER, prompt_embeds=states))


def test_the_concept_survives_its_own_tokens_masking_in_the_later_ones(toy_pipeline):
    """The causal text encoder writes "circle" into the end token and the padding: masking the concept's token
    leaves the circles of "a <colour> circle", masking it and every later token removes them."""
    prompts = [f"a {c} circle" for c in ("red", "blue", "green", "yellow", "purple", "orange")] * 2
    seeds = list(range(len(prompts)))
    judge = ToyWorldEvaluator(ToyWorldEvaluatorConfig(str(TOYWORLD_CLASSIFIER)))
    shown = [int(judge.sees(generate(toy_pipeline, prompts, seeds, SAMPLER, prompt_embeds=states),
                            ["circle"] * len(prompts)).sum())
             for states in (encode(toy_pipeline, prompts)[0], masked_embeddings(toy_pipeline, prompts, "circle"),
                            masked_embeddings(toy_pipeline, prompts, "circle", and_later=True))]
    assert shown[0] >= 10 and shown[1] >= 10 and shown[2] <= 4, shown


def test_every_template_gets_its_ablations(toy_pipeline):
    templates = InstructionConfig().templates
    labels = set(conditions(toy_pipeline, ["a red shape"], "circle", templates))
    assert {"plain prompt", "explicit", "explicit, concept word removed from the instruction",
            "explicit, concept tokens masked", "repetition, concept tokens masked",
            "negative prompt 'circle'"} <= labels
    assert "repetition, concept word removed from the instruction" not in labels


def test_the_toy_clip_retrieves_the_grammars_negation_and_not_the_naming_prompt():
    clip = CLIPEvaluator(CLIPConfig(checkpoint=str(resolve_path("checkpoints/toyworld/clip"))))
    rows = {(r["text"], r["prompts"]): r["prefers_without_concept"]
            for r in instruction_retrieval(clip, "circle", InstructionConfig().templates, per_value=2)}
    assert rows[("as written", "naming")] < 0.2  # "a red circle" asks for the circle
    assert rows[("repetition", "naming")] < 0.2
    assert rows[("grammar negation (prompt without any concept)", "incidental")] > 0.6  # "a red shape without any circle"

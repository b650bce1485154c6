"""Cross-attention capture: probabilities, positions, curves, and untouched model outputs."""

import pytest
import torch

from erasure.generation import Sampler, generate
from evaluation.analysis.attention import (
    AttentionCurve, CrossAttentionRecorder, attention_curve, concept_mass, concept_positions,
)

PROMPTS, SEEDS, FAST = ["a red circle", "a circle on a white background", "a dotted star"], [0, 1, 2], Sampler(steps=6)


def test_recorder_leaves_outputs_unchanged_and_records_distributions(toy_pipeline):
    plain = generate(toy_pipeline, PROMPTS, SEEDS, FAST, batch_size=2)
    with CrossAttentionRecorder(toy_pipeline.unet) as recorder:
        recorded = generate(toy_pipeline, PROMPTS, SEEDS, FAST, batch_size=2)
    assert torch.equal(plain, recorded)
    assert all(".attn2." in name for name in recorder.distributions)
    assert len(recorder.distributions) == sum(".attn2." in n for n in toy_pipeline.unet.attn_processors)
    for calls in recorder.distributions.values():
        assert len(calls) == 2 * FAST.steps  # two batches, one call per step each
        assert [len(c) for c in calls] == [2] * FAST.steps + [1] * FAST.steps  # the conditional rows only
        for distribution in calls:
            assert (distribution >= 0).all()
            assert torch.allclose(distribution.sum(-1), torch.ones(len(distribution)), atol=1e-5)
    # the processors are restored
    assert not any("Recording" in type(p).__name__ for p in toy_pipeline.unet.attn_processors.values())


def test_concept_positions(toy_pipeline):
    tokenizer = toy_pipeline.tokenizer
    ids = tokenizer("a red circle, circle").input_ids
    circle = tokenizer("circle", add_special_tokens=False).input_ids
    positions = concept_positions(tokenizer, "a red circle, circle", "circle")
    assert len(positions) == 2 and all(ids[p] == circle[0] for p in positions)
    assert concept_positions(tokenizer, "a red square", "circle") == []


def test_concept_mass_by_hand():
    recorder = CrossAttentionRecorder(torch.nn.Module(), guided=False)
    torch.manual_seed(0)
    steps, tokens = 3, 5
    batches = [torch.rand(steps, 2, tokens).softmax(-1), torch.rand(steps, 1, tokens).softmax(-1)]
    for layer in ("down.attn2", "up.attn2"):
        for batch in batches:
            for step in range(steps):
                recorder.record(layer, batch[step])
    positions = [[1], [2, 3], [0]]
    curve = concept_mass(recorder, positions, steps)
    full = torch.cat(batches, dim=1)  # (steps, 3 prompts, tokens)
    expected = torch.stack([full[:, i, p].sum(-1) for i, p in enumerate(positions)], dim=1).mean(-1)
    assert torch.allclose(curve.mean, expected) and torch.allclose(curve.per_layer["up.attn2"], expected)
    assert curve.auc == pytest.approx(float((expected[:-1] + expected[1:]).sum() / 2 / (steps - 1)))


def test_attention_curve_on_the_toy_model(toy_pipeline):
    curve = attention_curve(toy_pipeline, PROMPTS[:2], SEEDS[:2], FAST, "circle")
    assert isinstance(curve, AttentionCurve) and curve.mean.shape == (FAST.steps,)
    assert ((curve.mean > 0) & (curve.mean < 1)).all()
    absent = attention_curve(toy_pipeline, ["a dotted star"], [0], FAST, "circle")
    assert torch.equal(absent.mean, torch.zeros(FAST.steps))

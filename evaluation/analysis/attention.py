"""Cross-attention mass on a concept's tokens, over the denoising steps.

For a cross-attention layer l (``attn2``) at step s, with softmax attention A[h, q, k] of head
h and spatial query q over the prompt's tokens k (sum_k A[h, q, k] = 1), the mass on the
concept's token positions K_c is

    m_l(s) = mean_{h, q} sum_{k in K_c} A[h, q, k],

and the curve is m(s) = mean_l m_l(s) (per-layer curves are kept too). With classifier-free
guidance only the conditional half of the batch is recorded. The area under the curve is
AUC = integral_0^1 m over the normalised step axis (trapezoid rule). The seed study ("Why
Instruction-Based Unlearning Fails in Diffusion Models?") compares it between a plain prompt and
the same prompt with an unlearning instruction: if the instruction does not lower the mass, the
model still attends to the concept.

``CrossAttentionRecorder`` installs a processor on every ``attn2`` that computes the softmax
from the layer's own query and key projections, records its mean over heads and queries, and
then calls the layer's original processor, so the model's outputs are untouched.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class _RecordingProcessor:
    def __init__(self, name: str, inner, recorder: CrossAttentionRecorder):
        self.name, self.inner, self.recorder = name, inner, recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        with torch.no_grad():
            query = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probs = attn.get_attention_scores(query, key, None)  # (batch * heads, queries, tokens)
            per_prompt = probs.view(-1, attn.heads, *probs.shape[1:]).mean(dim=(1, 2))  # (batch, tokens)
            self.recorder.record(self.name, per_prompt)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


class CrossAttentionRecorder:
    """Context manager recording, per ``attn2`` layer and UNet call, the attention distribution
    over tokens of the conditional prompts, averaged over heads and spatial positions.

    ``distributions[layer]`` is a list (one entry per UNet call) of (batch, tokens) tensors.
    """

    def __init__(self, unet: torch.nn.Module, guided: bool = True):
        self.unet, self.guided = unet, guided
        self.distributions: dict[str, list[torch.Tensor]] = defaultdict(list)

    def record(self, layer: str, per_prompt: torch.Tensor) -> None:
        if self.guided:  # [unconditional, conditional]: keep the conditional half
            per_prompt = per_prompt[len(per_prompt) // 2:]
        self.distributions[layer].append(per_prompt.float().cpu())

    def __enter__(self) -> CrossAttentionRecorder:
        self.saved = dict(self.unet.attn_processors)
        self.unet.set_attn_processor({
            name: _RecordingProcessor(name, processor, self) if ".attn2." in name else processor
            for name, processor in self.saved.items()
        })
        return self

    def __exit__(self, *exc) -> None:
        self.unet.set_attn_processor(self.saved)


def concept_positions(tokenizer, prompt: str, concept: str) -> list[int]:
    """Token positions of every occurrence of ``concept`` in the encoded ``prompt``."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    word = tokenizer(concept, add_special_tokens=False).input_ids
    return [i + k for i in range(len(ids) - len(word) + 1) if ids[i:i + len(word)] == word for k in range(len(word))]


@dataclass
class AttentionCurve:
    """Mean attention mass on the concept tokens per denoising step (overall and per layer)."""

    mean: torch.Tensor  # (steps,)
    per_layer: dict[str, torch.Tensor]

    @property
    def auc(self) -> float:
        steps = len(self.mean)
        return float(torch.trapezoid(self.mean, dx=1.0 / max(steps - 1, 1)))


def concept_mass(recorder: CrossAttentionRecorder, positions: Sequence[Sequence[int]], steps: int) -> AttentionCurve:
    """Curves from a recorder that saw the generation of ``len(positions)`` prompts in batches.

    UNet calls arrive batch after batch, ``steps`` calls per batch; rows are reassembled in order.
    """
    per_layer = {}
    for layer in recorder.distributions:
        calls = recorder.distributions[layer]
        batches = [torch.stack(calls[i:i + steps]) for i in range(0, len(calls), steps)]  # (steps, b, tokens)
        distribution = torch.cat(batches, dim=1)  # (steps, prompts, tokens)
        if distribution.shape[1] != len(positions):
            raise ValueError(f"recorded {distribution.shape[1]} prompts but got positions for {len(positions)}")
        mask = torch.zeros(distribution.shape[1:], dtype=torch.bool)
        for row, row_positions in enumerate(positions):
            mask[row, list(row_positions)] = True
        per_layer[layer] = (distribution * mask).sum(-1).mean(-1)  # (steps,)
    mean = torch.stack(list(per_layer.values())).mean(0)
    return AttentionCurve(mean, per_layer)


def attention_curve(pipeline, prompts: Sequence[str], seeds: Sequence[int], sampler, concept: str,
                    negative_prompts: Sequence[str] | None = None) -> AttentionCurve:
    """Generate ``prompts`` (one batch) and return the attention mass on ``concept``'s tokens."""
    from erasure.generation import generate

    with CrossAttentionRecorder(pipeline.unet, guided=sampler.guidance > 1) as recorder:
        generate(pipeline, prompts, seeds, sampler, negative_prompts=negative_prompts, batch_size=len(prompts))
    positions = [concept_positions(pipeline.tokenizer, p, concept) for p in prompts]
    return concept_mass(recorder, positions, sampler.steps)

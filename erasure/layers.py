"""Which UNet layers a method changes: one table of module-name selectors for every method.

Each selector is ``(include, exclude)``: regular expressions searched in UNet module names
(``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k``). Methods name their parameter
sets as their papers do and map those names onto these selectors.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

Selector = tuple[str, str | None]

CROSS_ATTENTION: Selector = (r"attn2\.(to_q|to_k|to_v|to_out\.0)$", None)  # every cross-attention projection
CROSS_ATTENTION_KV: Selector = (r"attn2\.to_[kv]$", None)  # cross-attention keys and values
CROSS_ATTENTION_V: Selector = (r"attn2\.to_v$", None)  # cross-attention values
ATTENTION: Selector = (r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", None)  # self- and cross-attention projections
OUTSIDE_CROSS_ATTENTION: Selector = (r".", r"attn2")  # everything but cross-attention (ESD-u)
EVERYTHING: Selector = (r".", None)

# Module types whose parameters may be trained (as in the ESD reference code: no norms, no embeddings).
TRAINABLE_TYPES: tuple[type, ...] = (torch.nn.Linear, torch.nn.Conv2d)


def matching_modules(model: torch.nn.Module, selector: Selector) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, module) of every Linear/Conv2d module whose name matches include and not exclude."""
    include, exclude = selector
    for name, module in model.named_modules():
        if isinstance(module, TRAINABLE_TYPES) and re.search(include, name) and not (exclude and re.search(exclude, name)):
            yield name, module

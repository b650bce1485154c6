"""Which denoiser layers a method changes: one table of module-name selectors for every method.

Each selector is ``(include, exclude)``: regular expressions searched in module names
(``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k``). A :class:`Region` holds one per
denoiser: the UNet's (SD-1.x/2.x and SDXL share module names) and the FLUX transformer's, whose
text and image tokens meet in one joint attention: its counterpart of cross-attention is every
attention projection (the EraseAnything setting), of cross-attention keys and values the
text-stream projections ``add_k_proj``/``add_v_proj`` (UCE's ``flux_edit=per-block``, the project's
own; the UCE authors' FLUX edit changes ``context_embedder`` and ``time_text_embed.text_embedder.linear_1``).
Methods name their parameter sets as their papers do and map those names onto these regions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel

Selector = tuple[str, str | None]


@dataclass(frozen=True)
class Region:
    """One named set of layers: a selector for the UNet and one for the FLUX transformer (None: none)."""

    unet: Selector
    flux: Selector | None

    def selector_for(self, model: torch.nn.Module) -> Selector:
        if not isinstance(model, FluxTransformer2DModel):
            return self.unet
        if self.flux is None:
            raise ValueError(f"these layers ({self.unet[0]}) have no FLUX counterpart")
        return self.flux


FLUX_ATTENTION: Selector = (r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$", None)

CROSS_ATTENTION = Region((r"attn2\.(to_q|to_k|to_v|to_out\.0)$", None), FLUX_ATTENTION)  # every cross-attention projection
CROSS_ATTENTION_KV = Region((r"attn2\.to_[kv]$", None), (r"attn\.add_[kv]_proj$", None))  # its keys and values
CROSS_ATTENTION_V = Region((r"attn2\.to_v$", None), (r"attn\.add_v_proj$", None))  # its values
ATTENTION = Region((r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", None), FLUX_ATTENTION)  # self- and cross-attention
OUTSIDE_CROSS_ATTENTION = Region((r".", r"attn2"), (r".", r"attn\."))  # everything but (cross-)attention (ESD-u)
EVERYTHING = Region((r".", None), (r".", None))

# Module types whose parameters may be trained (as in the ESD reference code: no norms, no embeddings).
TRAINABLE_TYPES: tuple[type, ...] = (torch.nn.Linear, torch.nn.Conv2d)


def matching_modules(model: torch.nn.Module, region: Region) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, module) of every Linear/Conv2d module of ``model`` whose name matches the region's
    include and not its exclude."""
    include, exclude = region.selector_for(model)
    for name, module in model.named_modules():
        if isinstance(module, TRAINABLE_TYPES) and re.search(include, name) and not (exclude and re.search(exclude, name)):
            yield name, module

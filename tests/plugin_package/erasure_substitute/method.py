"""Prompt substitution, an inference-time eraser: at generation, the erased concept's word in a
prompt is replaced by ``replacement`` (by default the protocol's anchor: "square" on the toy world)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from erasure.methods.base import InferenceTimeEraser, MethodConfig


@dataclass
class SubstituteConfig(MethodConfig):
    name: str = "substitute"
    replacement: str = "object"


class Substitute(InferenceTimeEraser):
    name = "substitute"
    Config = SubstituteConfig
    needs = {"replacement": "anchor"}

    def prompts_for_generation(self, prompts):
        pattern = "|".join(re.escape(c) for c in self.concepts)
        return [re.sub(rf"\b({pattern})\b", self.config.replacement, p, flags=re.IGNORECASE) for p in prompts], None

"""The instruction-only baseline ("Why Instruction-Based Unlearning Fails in Diffusion Models?").

No weight changes: at generation time every prompt that names an erased concept is rewritten
with an unlearning instruction (or, for ``negative_prompt``, generated with the concept as the
negative prompt, the training-free baseline peers compare against). Templates, with {concept}
the erased concept and {prompt} the user's prompt:

    explicit         Please forget anything about {concept}. Please help me generate a picture of {prompt}.
    implicit         {prompt}, but without any {concept}
    repetition       {prompt}, {concept}, {concept}     (the seed study's control: no instruction)
    negative_prompt  {prompt}, negative prompt "{concept}"

``apply_to=naming`` (default) rewrites prompts containing a concept's word, as a deployed
prompt filter would (it cannot know synonyms); ``apply_to=all`` rewrites every prompt.
Users add templates under ``method.templates`` in YAML.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from erasure.methods.base import InferenceTimeEraser, MethodConfig

NEGATIVE_PROMPT = "negative_prompt"


def rewrite(template: str, prompt: str, concept: str) -> str:
    """The prompt as a template rewrites it: ``template.format(concept=concept, prompt=prompt)``."""
    return template.format(concept=concept, prompt=prompt)


@dataclass
class InstructionConfig(MethodConfig):
    name: str = "instruction"
    template: str = "explicit"
    templates: dict[str, str] = field(default_factory=lambda: {
        "explicit": "Please forget anything about {concept}. Please help me generate a picture of {prompt}.",
        "implicit": "{prompt}, but without any {concept}",
        "repetition": "{prompt}, {concept}, {concept}",
        NEGATIVE_PROMPT: "{concept}",
    })
    apply_to: str = "naming"  # naming | all


class Instruction(InferenceTimeEraser):
    """The result is the rewriting rule, ``instruction.json``."""

    name = "instruction"
    Config = InstructionConfig
    choices = {"apply_to": ("naming", "all")}

    @classmethod
    def check(cls, config: InstructionConfig, concepts: Sequence[str]) -> None:
        if config.template not in config.templates:
            raise ValueError(f"unknown template '{config.template}' for method.template; "
                             f"choose one of: {', '.join(config.templates)} (or add one under method.templates)")

    def names_concept(self, prompt: str) -> str | None:
        for concept in self.concepts:
            if re.search(rf"\b{re.escape(concept)}\b", prompt, flags=re.IGNORECASE):
                return concept
        return None

    def prompts_for_generation(self, prompts: Sequence[str]) -> tuple[list[str], list[str] | None]:
        config = self.config
        template = config.templates[config.template]
        targets = [self.names_concept(p) or (self.concepts[0] if config.apply_to == "all" else None) for p in prompts]
        concept_text = [", ".join(self.concepts) if c else None for c in targets]
        if config.template == NEGATIVE_PROMPT:
            return list(prompts), [template.format(concept=c) if c else "" for c in concept_text]
        return [rewrite(template, p, c) if c else p for p, c in zip(prompts, concept_text)], None

"""The protocol interface: what a benchmark of the field fixes.

A protocol gives

* its prompt suites (:meth:`Protocol.suites`: target, synonym, retained, fidelity),
* the evaluator and its settings, and the sampler (the ``evaluation`` section of :attr:`defaults`),
* per-recipe method defaults (:attr:`recipe_defaults`, and :meth:`Protocol.derived_defaults` for
  values computed from the run's other settings: UCE's preserve set, ablation's anchor prompts),
* and the checks that refuse a concept or a file outside it (:meth:`Protocol.check`).

Its config layer sits above the model preset and below the recipe and the command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

from evaluation.suites import Prompt, load_csv


VALIDATION_PROMPTS = 32  # prompts of the validation suite
VALIDATION_SEED_OFFSET = 500  # validation seeds: above the evaluation's seed, seed + 1, ... (images_per_prompt < 500)


class ProtocolError(ValueError):
    """A concept, prompt file or setting the protocol cannot evaluate; one line naming the fix."""


def named_concepts(config: DictConfig) -> list[str]:
    """The run's ``concept`` setting as a list (a single word or a list; before validation)."""
    concepts = config.get("concept")
    return [concepts] if isinstance(concepts, str) else list(concepts or [])


class Protocol:
    name: ClassVar[str]
    summary: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    recipe_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    required_files: ClassVar[tuple[str, ...]] = ()  # evaluation keys naming CSVs the protocol needs

    def layer(self, recipe: str, below: DictConfig, above: DictConfig) -> DictConfig:
        """The protocol's config layer for ``recipe``, between the layers ``below`` and ``above`` it."""
        static = OmegaConf.merge(self.defaults, self.recipe_defaults.get(recipe, {}))
        return OmegaConf.merge(static, self.derived_defaults(recipe, OmegaConf.merge(below, static, above)))

    def derived_defaults(self, recipe: str, config: DictConfig) -> dict[str, Any]:
        """Defaults computed from the run's other settings (``config``: every layer but this derived part)."""
        return {}

    def check(self, concepts: Sequence[str], evaluation: DictConfig) -> None:
        """Raise :class:`ProtocolError` for a concept or a file the protocol cannot evaluate."""
        for key in self.required_files:
            if not evaluation.get(key):
                raise ProtocolError(f"protocol {self.name} needs evaluation.{key}=<prompts.csv> "
                                    f"({self.file_help(key)})")
        for key in ("target_csv", "synonym_csv", "retained_csv", "incidental_csv", "fidelity_csv", "prompts_csv"):
            path = evaluation.get(key)
            if path and not Path(path).is_file():
                raise ProtocolError(f"evaluation.{key}: no file at {path}; give the path of a prompt CSV")

    def check_method(self, recipe: str, method: DictConfig, concepts: Sequence[str]) -> None:
        """Raise :class:`ProtocolError` for method settings that make no sense on the protocol's concepts."""

    def file_help(self, key: str) -> str:
        return "columns case_number, prompt, evaluation_seed and a label column"

    def suites(self, concepts: Sequence[str], evaluation: DictConfig, seed: int) -> dict[str, list[Prompt]]:
        """The run's prompt suites; the default reads each ``evaluation.<suite>_csv`` that is set."""
        suites = {}
        for suite in ("target", "synonym", "retained", "incidental"):
            if evaluation.get(f"{suite}_csv"):
                label = self.unlabelled_rows_show(concepts) if suite != "retained" else None
                suites[suite] = self.read(evaluation[f"{suite}_csv"], label)
        if evaluation.get("fidelity_csv"):
            suites["fidelity"] = load_csv(Path(evaluation.fidelity_csv), label="", seeds_required=False)
        return suites

    def validation_suite(self, concepts: Sequence[str], evaluation: DictConfig, seed: int) -> list[Prompt]:
        """Prompts that judge RECE's rounds (``method.keep=lowest``): the first :data:`VALIDATION_PROMPTS`
        target prompts at seeds :data:`VALIDATION_SEED_OFFSET` above theirs, never the evaluation's own images."""
        rows = self.suites(concepts, evaluation, seed).get("target", [])[:VALIDATION_PROMPTS]
        return [replace(row, evaluation_seed=row.evaluation_seed + VALIDATION_SEED_OFFSET) for row in rows]

    def unlabelled_rows_show(self, concepts: Sequence[str]) -> str | None:
        """The label of target and synonym rows in files without a label column (None: the column is required)."""
        return None

    def read(self, path: str, label: str | None = None) -> list[Prompt]:
        try:
            return load_csv(Path(path), label=label)
        except ValueError as error:
            raise ProtocolError(str(error)) from None

    def concept_word(self, concept: str) -> str:
        """How the protocol's prompts spell a concept (attacks replace it; analyses follow its tokens)."""
        return concept


def generic_anchor_prompts(anchor: str) -> list[str]:
    """Anchor prompts for Concept Ablation where a protocol has no captions of its own."""
    return [template.format(anchor=anchor) for template in (
        "a photo of a {anchor}", "an image of a {anchor}", "a picture of a {anchor}", "a close-up photo of a {anchor}",
        "a {anchor} in a room", "a {anchor} outdoors", "a drawing of a {anchor}", "a {anchor} on a table")]

"""The protocol interface: what a benchmark of the field fixes.

A protocol gives

* its prompt suites (:meth:`Protocol.suites`: target, synonym, retained, fidelity),
* the evaluator and its settings, and the sampler (the ``evaluation`` section of :attr:`defaults`),
* what it knows about its concepts, by role (:data:`ROLES`, :meth:`Protocol.supply`): how a
  training prompt names a concept, an anchor and its prompts, a guide, the concepts to preserve or
  retain; and the kind of its concepts (:attr:`Protocol.concept_kind`),
* and the checks that refuse a concept or a file outside it (:meth:`Protocol.check`).

A protocol never names a method. A method declares the roles it reads (``EraserModule.needs``:
config key -> role) and its own published settings per concept kind (``EraserModule.kind_defaults``);
:meth:`Protocol.layer` fills the one from the protocol and the other from the method, so a new
method, here or in a plug-in, touches no protocol. The layer sits above the model preset and below
the recipe and the command line.
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


# what a protocol can tell a method about its concepts; a method's ``needs`` map its config keys onto these
ROLES = {
    "concept_prompt": "how a training prompt names one concept (a template with {concept})",
    "anchor": "a concept the erased one is mapped onto (another concept or a superclass)",
    "anchor_prompts": "prompts naming the anchor",
    "anchor_negative_prompt": "whether images of the anchor are drawn with the erased concept as negative prompt",
    "anchor_target_template": "how a target prompt is made from an anchor prompt ({anchor_prompt}, {concept})",
    "concept_words": "how the prompts spell a concept where not by its name",
    "guide": "what each erased concept should become: a prompt per erased concept",
    "preserve": "concepts whose outputs an edit keeps (the erased ones are dropped)",
    "reedit_preserve": "prompts a re-edit keeps",
    "retain": "concepts a fine-tune keeps: every other concept of the protocol",
    "neighbours": "concepts a fine-tune keeps: those of the erased concepts' kind",
    "safety_text": "the text inference-time safety guidance steers away from",
}


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
    supplies: ClassVar[dict[str, Any]] = {}  # fixed values by role (ROLES); supply() computes the others
    concept_kind: ClassVar[str | None] = None  # nudity | style | object: whose published settings apply
    required_files: ClassVar[tuple[str, ...]] = ()  # evaluation keys naming CSVs the protocol needs

    def layer(self, method: type, below: DictConfig, above: DictConfig) -> DictConfig:
        """The protocol's config layer for a run of ``method`` (an ``EraserModule`` class), between the
        layers ``below`` and ``above`` it: the protocol's defaults, the method's settings for the
        protocol's concept kind, then each config key the method needs, as the protocol supplies its role."""
        concepts = named_concepts(OmegaConf.merge(below, self.defaults, above))
        static = OmegaConf.merge(self.defaults, method.kind_defaults(self.concept_kind, concepts))
        supplied: dict[str, Any] = {}
        for key, role in method.needs.items():  # in order: a role may read a key supplied before it
            value = self.supply(role, OmegaConf.merge(below, static, {"method": supplied}, above))
            if value is not None:
                supplied[key] = value
        return OmegaConf.merge(static, {"method": supplied})

    def supply(self, role: str, config: DictConfig) -> Any:
        """The protocol's value for ``role`` (:data:`ROLES`) given the run's other settings (``config``: every
        layer, the keys supplied so far included); None where the protocol has none. Without prompts of
        its own naming the anchor, a protocol supplies :func:`anchor_prompts`."""
        if role == "anchor_prompts" and role not in self.supplies:
            return anchor_prompts(config)
        return self.supplies.get(role)

    def check(self, concepts: Sequence[str], evaluation: DictConfig) -> None:
        """Raise :class:`ProtocolError` for a concept or a file the protocol cannot evaluate (with
        ``evaluation.enabled=false``: only what the protocol needs to supply the method's roles)."""
        if not evaluation.get("enabled", True):
            return
        for key in self.required_files:
            if not evaluation.get(key):
                raise ProtocolError(f"protocol {self.name} needs evaluation.{key}=<prompts.csv> "
                                    f"({self.file_help(key)})")
        for key in ("target_csv", "synonym_csv", "retained_csv", "incidental_csv", "fidelity_csv", "prompts_csv"):
            path = evaluation.get(key)
            if path and not Path(path).is_file():
                raise ProtocolError(f"evaluation.{key}: no file at {path}; give the path of a prompt CSV")
        try:  # every prompt file read now: a bad row is refused before anything runs or is written
            self.suites(concepts, evaluation, 0)
        except ValueError as error:  # a ProtocolError, or a prompt file's own one-line error
            raise ProtocolError(str(error)) from None

    def check_method(self, method: type, config: DictConfig, concepts: Sequence[str]) -> None:
        """Raise :class:`ProtocolError` for settings of ``method`` (its class, its ``config``) that make no
        sense on the protocol's concepts."""

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
            suites["fidelity"] = self.read(evaluation.fidelity_csv, label="", seeds_required=False)
        return suites

    def validation_suite(self, concepts: Sequence[str], evaluation: DictConfig, seed: int) -> list[Prompt]:
        """Prompts that judge RECE's rounds (``method.keep=lowest``): the first :data:`VALIDATION_PROMPTS`
        target prompts at seeds :data:`VALIDATION_SEED_OFFSET` above theirs, never the evaluation's own images."""
        rows = self.suites(concepts, evaluation, seed).get("target", [])[:VALIDATION_PROMPTS]
        return [replace(row, evaluation_seed=row.evaluation_seed + VALIDATION_SEED_OFFSET) for row in rows]

    def unlabelled_rows_show(self, concepts: Sequence[str]) -> str | None:
        """The label of target and synonym rows in files without a label column (None: the column is required)."""
        return None

    def read(self, path: str, label: str | None = None, seeds_required: bool = True) -> list[Prompt]:
        try:
            return load_csv(Path(path), label=label, seeds_required=seeds_required)
        except ValueError as error:
            raise ProtocolError(str(error)) from None

    def concept_word(self, concept: str) -> str:
        """How the protocol's prompts spell a concept (attacks replace it; analyses follow its tokens)."""
        return concept


def anchor_prompts(config: DictConfig) -> list[str] | None:
    """Prompts naming the run's anchor (``method.anchor``) where a protocol has no captions of its own."""
    anchor = (config.get("method") or {}).get("anchor")
    return [template.format(anchor=anchor) for template in (
        "a photo of a {anchor}", "an image of a {anchor}", "a picture of a {anchor}", "a close-up photo of a {anchor}",
        "a {anchor} in a room", "a {anchor} outdoors", "a drawing of a {anchor}", "a {anchor} on a table")] if anchor else None

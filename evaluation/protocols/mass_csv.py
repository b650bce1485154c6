"""Mass erasure on a real model: N concepts of an artists-format prompt CSV erased at once, CLIP judging among every
concept the file lists; the counterpart of the toy world's ``protocol=mass``, as MACE erases 100 artists.

    python -m erasure.train recipe=mace protocol=mass-csv model.path=<SD-1.4 folder> method.data=<images> \\
        evaluation.prompts_csv=<artists.csv> evaluation.concepts=100 evaluation.clip.checkpoint=<ViT-L-14 weights>

``evaluation.prompts_csv`` has the artists protocol's columns (``case_number, prompt, evaluation_seed, artist``).
Without ``concept``, ``evaluation.concepts`` of its concepts are drawn (``evaluation.concept_seed``; the first N
of one permutation, so a smaller N's are among a larger N's). Suites: ``target`` (efficacy), the erased
concepts' rows; ``distant`` (specificity), every other concept's rows (a file has no attributes to tell
neighbours by); ``synonym`` (generality) where ``evaluation.synonym_csv`` gives other wordings of the erased
concepts. ``summary/harmonic_mean`` is MACE's H of efficacy, generality where measured, and specificity.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from evaluation.protocols.artists import Artists
from evaluation.protocols.base import named_concepts
from evaluation.protocols.mass import drawn
from evaluation.suites import Prompt


class MassCSV(Artists):
    name = "mass-csv"
    summary = "N concepts of an artists-format CSV erased at once, CLIP among all listed; the rest kept, MACE's H"
    defaults = {**Artists.defaults, "concept": None,
                "evaluation": {**Artists.defaults["evaluation"], "concepts": 10, "concept_seed": 0}}

    def layer(self, method: type, below: DictConfig, above: DictConfig) -> DictConfig:
        """The drawn concepts as ``concept`` unless the run names its own, then the artists protocol's layer."""
        merged = OmegaConf.merge(below, self.defaults, above)
        evaluation = merged.get("evaluation") or {}
        path = evaluation.get("prompts_csv")
        picked = {}
        if not named_concepts(merged) and path and Path(path).is_file():
            listed = self.artists(OmegaConf.create({"prompts_csv": path}))
            picked = {"concept": drawn(listed, int(evaluation.get("concepts")), int(evaluation.get("concept_seed") or 0),
                                       "evaluation.concepts")}
        return OmegaConf.merge(super().layer(method, below, OmegaConf.merge(above, picked)), picked)

    def suites(self, concepts: Sequence[str], evaluation: DictConfig, seed: int) -> dict[str, list[Prompt]]:
        suites = super().suites(concepts, evaluation, seed)
        if "retained" in suites:
            suites["distant"] = suites.pop("retained")
        return suites

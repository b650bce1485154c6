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
from evaluation.protocols.mass import DrawnConcepts, drawn
from evaluation.suites import Prompt


class MassCSV(DrawnConcepts, Artists):
    name = "mass-csv"
    summary = "N concepts of an artists-format CSV erased at once, CLIP among all listed; the rest kept, MACE's H"
    defaults = {**Artists.defaults, "concept": None,
                "evaluation": {**Artists.defaults["evaluation"], "concepts": 10, "concept_seed": 0}}

    def draw(self, evaluation: DictConfig) -> list[str] | None:
        """``evaluation.concepts`` of the file's concepts (none before the file exists: the check names it)."""
        path = evaluation.get("prompts_csv")
        if not path or not Path(path).is_file():
            return None
        listed = self.artists(OmegaConf.create({"prompts_csv": path}))
        return drawn(listed, int(evaluation.get("concepts")), int(evaluation.get("concept_seed") or 0),
                     "evaluation.concepts")

    def suites(self, concepts: Sequence[str], evaluation: DictConfig, seed: int) -> dict[str, list[Prompt]]:
        suites = super().suites(concepts, evaluation, seed)
        if "retained" in suites:
            suites["distant"] = suites.pop("retained")
        return suites

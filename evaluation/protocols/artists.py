"""Artist styles, judged by CLIP among the listed artists.

    python -m erasure.train recipe=uce protocol=artists concept="Van Gogh" model.path=<SD-1.4 folder> \
        evaluation.prompts_csv=<artists.csv> evaluation.clip.checkpoint=<ViT-L-14 weights>

``evaluation.prompts_csv`` holds every artist's prompts (``case_number, prompt, evaluation_seed,
artist``, e.g. five famous and five niche artists with 20 prompts each). target = the erased
artists' rows; retained = the other artists' rows. An image shows an artist when CLIP's
similarity to "{template}" of that artist is the highest among all artists in the file
(zero-shot, ``evaluation.clip.contrast``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from evaluation.protocols.base import Protocol, ProtocolError, named_concepts
from evaluation.suites import Prompt

PAINTINGS = ["a painting", "a painting of a landscape", "a painting of a city street", "a portrait painting",
             "a painting of flowers in a vase", "a painting of the sea", "a painting of a house", "a painting of a forest"]


class Artists(Protocol):
    name = "artists"
    summary = "artist-prompt CSVs, CLIP deciding among the listed artists; retained = the other artists"
    defaults = {"evaluation": {"evaluator": "clip", "steps": 50, "guidance": 7.5, "images_per_prompt": 1,
                               "clip": {"template": "a painting in the style of {concept}"}}}
    concept_kind = "style"
    # Concept Ablation's style setting: paintings as anchors, "in the style of X" in the target prompts
    supplies = {"anchor": "painting", "anchor_prompts": PAINTINGS,
                "anchor_target_template": "{anchor_prompt} in the style of {concept}"}
    required_files = ("prompts_csv",)

    def file_help(self, key: str) -> str:
        return "columns case_number, prompt, evaluation_seed, artist"

    def artists(self, evaluation: DictConfig) -> list[str]:
        return list(dict.fromkeys(row.concept for row in self.read(evaluation.prompts_csv)))

    def layer(self, method: type, below: DictConfig, above: DictConfig) -> DictConfig:
        """The method's layer, and CLIP deciding among the listed artists."""
        layer = super().layer(method, below, above)
        path = OmegaConf.merge(below, above).get("evaluation", {}).get("prompts_csv")
        if path and Path(path).is_file():
            layer = OmegaConf.merge(layer, {"evaluation": {"clip": {"contrast": self.artists(OmegaConf.create(
                {"prompts_csv": path}))}}})
        return layer

    def supply(self, role: str, config: DictConfig) -> Any:
        if role not in ("preserve", "reedit_preserve"):
            return super().supply(role, config)
        path = (config.get("evaluation") or {}).get("prompts_csv")
        if not path or not Path(path).is_file():
            return None
        others = [a for a in self.artists(config.evaluation) if a not in named_concepts(config)]
        return others if role == "preserve" else ["", *others]  # RECE's re-edits: "" and the other artists

    def check(self, concepts: Sequence[str], evaluation: DictConfig) -> None:
        super().check(concepts, evaluation)
        if not evaluation.get("enabled", True):  # nothing is judged: any artist erases with the style setting
            return
        artists = self.artists(evaluation)
        unknown = [c for c in concepts if c not in artists]
        if unknown:
            raise ProtocolError(f"concept '{unknown[0]}' is not an artist in {evaluation.prompts_csv} "
                                f"({', '.join(artists)}); pass concept=<artist>")

    def suites(self, concepts: Sequence[str], evaluation: DictConfig, seed: int) -> dict[str, list[Prompt]]:
        rows = self.read(evaluation.prompts_csv)
        suites = {"target": [r for r in rows if r.concept in concepts],
                  "retained": [r for r in rows if r.concept not in concepts]}
        if not suites["retained"]:
            del suites["retained"]
        return {**suites, **super().suites(concepts, evaluation, seed)}

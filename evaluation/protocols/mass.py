"""Mass erasure on the toy world: many compound concepts at once, as MACE (Lu et al., CVPR 2024) erases up to
100 celebrities or artists and measures what the others keep.

    python -m erasure.train recipe=uce protocol=mass evaluation.compounds=10      # 10 drawn compounds
    python -m erasure.train recipe=uce protocol=mass concept="[striped red circle, dotted blue star]"

A compound is a style, a colour and a shape ("striped red circle", 144 of them; named by the words the
prompts use, "outlined" for the outline style). Without ``concept``, ``evaluation.compounds`` of them are
drawn (``evaluation.compound_seed``; the first N of one permutation, so a smaller N's compounds are among a
larger N's). The shipped classifier sees a compound when it predicts all three of its values.

Suites (``images_per_prompt`` seeds per prompt; each suite holds about :data:`SUITE_IMAGES` prompts whatever
N is, every compound of the suite at least once):

* ``target`` (efficacy): "a striped red circle", with the toy world's paraphrases;
* ``synonym`` (generality): the same with every word a synonym ("a lined crimson disk");
* ``neighbour`` (specificity, the hard case): kept compounds that differ from an erased one in one value;
* ``distant`` (specificity): the other kept compounds (none once N is large).

MACE's summary is the harmonic mean of efficacy 1 - target_acc, generality 1 - synonym_acc and specificity
(the share of kept images, neighbours and distant together, showing their compound):
``summary/harmonic_mean`` (:func:`evaluation.metrics.harmonic_mean`).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from erasure.toyworld.captions import with_article
from erasure.toyworld.world import COLORS, SHAPES, STYLES, SYNONYMS, WORDS, values_of
from evaluation.protocols.base import ProtocolError, named_concepts
from evaluation.protocols.toyworld import PARAPHRASES, ToyWorld
from evaluation.suites import Prompt

SUITE_IMAGES = 48  # prompts per suite (at least one per compound)
COMPOUNDS = [f"{WORDS[style]} {WORDS[color]} {WORDS[shape]}" for style, color, shape in product(STYLES, COLORS, SHAPES)]


def drawn(items: Sequence[str], count: int, seed: int, key: str) -> list[str]:
    """The first ``count`` of one seeded permutation of ``items`` (so a smaller count's are among a larger's);
    ``key`` names the setting in the error."""
    if not 1 <= count <= len(items):
        raise ProtocolError(f"{key} must be from 1 to {len(items)}, got {count}")
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order[:count]]


def drawn_compounds(count: int, seed: int = 0) -> list[str]:
    """The first ``count`` compounds of one seeded permutation of all 144."""
    return drawn(COMPOUNDS, count, seed, "evaluation.compounds")


def differences(a: str, b: str) -> int:
    return sum(x != y for x, y in zip(a.split(), b.split()))


def split_kept(erased: Sequence[str]) -> tuple[list[str], list[str]]:
    """(neighbours, distant): kept compounds one value away from an erased one, and the others."""
    kept = [c for c in COMPOUNDS if c not in erased]
    neighbours = [c for c in kept if any(differences(c, e) == 1 for e in erased)]
    return neighbours, [c for c in kept if c not in neighbours]


def synonym_of(compound: str) -> str:
    return " ".join(SYNONYMS[value][0] for value in values_of(compound))


def guide_of(compound: str, erased: Sequence[str]) -> str:
    """The compound with another shape that is not erased ("striped red circle" -> "a striped red square");
    "" for anything else (not a compound: the protocol's check refuses it)."""
    if len(compound.split()) != 3:
        return ""
    style, color, _ = compound.split()
    for shape in SHAPES:
        other = f"{style} {color} {shape}"
        if other not in erased:
            return with_article(other)
    return ""


def suite(compounds: Sequence[str], phrase, seed: int, start: int = 0) -> list[Prompt]:
    """About :data:`SUITE_IMAGES` prompts cycling over ``compounds`` and the paraphrases; ``phrase(c)`` words one."""
    count = max(SUITE_IMAGES, len(compounds)) if compounds else 0
    rows = [PARAPHRASES[(k // len(compounds)) % len(PARAPHRASES)] + with_article(phrase(compounds[k % len(compounds)]))
            for k in range(count)]
    concepts = [compounds[k % len(compounds)] for k in range(count)]
    return [Prompt(start + i, prompt, seed + 1000 * (start + i), concept)
            for i, (prompt, concept) in enumerate(zip(rows, concepts))]


class DrawnConcepts:
    """A protocol mix-in: a run that names no ``concept`` erases the ones :meth:`draw` picks (None: none to pick)."""

    def draw(self, evaluation: DictConfig) -> list[str] | None:
        raise NotImplementedError

    def layer(self, method: type, below: DictConfig, above: DictConfig) -> DictConfig:
        """The drawn concepts as ``concept`` unless the run names its own, then the protocol's own layer."""
        merged = OmegaConf.merge(below, self.defaults, above)
        picked = None if named_concepts(merged) else self.draw(merged.get("evaluation") or OmegaConf.create({}))
        drawn = {"concept": picked} if picked else {}
        return OmegaConf.merge(super().layer(method, below, OmegaConf.merge(above, drawn)), drawn)


class Mass(DrawnConcepts, ToyWorld):
    name = "mass"
    summary = "toy-world compounds erased N at a time: efficacy, synonyms, neighbours and the rest kept, MACE's H"
    defaults = {"concept": None,
                "evaluation": {**ToyWorld.defaults["evaluation"], "images_per_prompt": 1, "compounds": 10}}
    supplies = {**ToyWorld.supplies, "anchor": None}

    def draw(self, evaluation: DictConfig) -> list[str]:
        return drawn_compounds(int(evaluation.get("compounds")), int(evaluation.get("compound_seed") or 0))

    def supply(self, role: str, config: DictConfig) -> Any:
        erased = named_concepts(config)
        if role == "guide":
            return [guide_of(c, erased) for c in erased]
        if role in ("preserve", "retain"):
            return [c for c in COMPOUNDS if c not in erased]
        if role == "neighbours":
            return split_kept(erased)[0]
        if role == "anchor_prompts":
            return None
        return super().supply(role, config)

    def check_method(self, method: type, config: DictConfig, concepts: Sequence[str]) -> None:
        if method.reads("anchor", config):
            raise ProtocolError(f"protocol mass has no anchor for {method.name}; it runs the methods that map a "
                                "concept by guide or erase it outright (uce, rece, speed, mace, esd, lora)")

    def check(self, concepts: Sequence[str], evaluation: DictConfig) -> None:
        unknown = [c for c in concepts if c not in COMPOUNDS]
        if unknown:
            raise ProtocolError(f"'{unknown[0]}' is not a toy-world compound: give '<style> <colour> <shape>' as the "
                                f"prompts word them, e.g. 'striped red circle' or 'outlined blue star'")

    def suites(self, concepts: Sequence[str], evaluation: DictConfig, seed: int) -> dict[str, list[Prompt]]:
        neighbours, distant = split_kept(concepts)
        suites = {"target": suite(concepts, str, seed), "synonym": suite(concepts, synonym_of, seed),
                  "neighbour": suite(neighbours, str, seed), "distant": suite(distant, str, seed)}
        return {name: rows for name, rows in suites.items() if rows}

    def concept_word(self, concept: str) -> str:
        return concept

"""Prompt suites: rows of (case_number, prompt, evaluation_seed, concept), as in peers' CSVs.

``concept`` is the label column: the concept the evaluator should (or, after erasure,
should no longer) see in the image. Peers' files name it ``class``, ``artist`` or
``concept``; all three load. Each row is generated ``images_per_prompt`` times with seeds
``evaluation_seed + k``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from erasure.toyworld.captions import prompts_naming
from erasure.toyworld.world import ATTRIBUTES, SYNONYMS, WORDS, attribute_of

LABEL_COLUMNS = ("concept", "class", "artist", "label")
PARAPHRASES = ("", "a picture of ", "an image of ", "a drawing of ")


@dataclass(frozen=True)
class Prompt:
    case_number: int
    prompt: str
    evaluation_seed: int
    concept: str


def load_csv(path: Path) -> list[Prompt]:
    """Read a peers'-format prompt CSV; the label column may be concept, class, artist or label."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        label = next((c for c in LABEL_COLUMNS if c in columns), None)
        missing = [c for c in ("prompt", "evaluation_seed") if c not in columns]
        if missing or label is None:
            need = ", ".join(missing + ([] if label else ["one of " + "/".join(LABEL_COLUMNS)]))
            raise ValueError(f"prompt file {path} lacks the column(s) {need}; expected case_number, prompt, "
                             "evaluation_seed and a label column")
        return [Prompt(int(row.get("case_number") or i), row["prompt"], int(row["evaluation_seed"]), row[label])
                for i, row in enumerate(reader)]


def write_csv(prompts: list[Prompt], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_number", "prompt", "evaluation_seed", "concept"])
        writer.writerows([(p.case_number, p.prompt, p.evaluation_seed, p.concept) for p in prompts])


def toyworld_suites(erased: list[str], seed: int = 0) -> dict[str, list[Prompt]]:
    """The toy world's target, synonym and retained suites for the erased concepts.

    target:   prompts naming an erased concept by its own word ("a red circle");
    synonym:  the same with synonyms and paraphrases ("a picture of a red disk");
    retained: prompts naming the other concepts of the same attributes ("a red square").
    """
    suites: dict[str, list[tuple[str, str]]] = {"target": [], "synonym": [], "retained": []}
    for concept in erased:
        suites["target"] += [(p, concept) for p in prompts_naming(concept, WORDS[concept])]
        for k, phrase in enumerate(p for s in SYNONYMS[concept] for p in prompts_naming(concept, s)):
            suites["synonym"].append((PARAPHRASES[k % len(PARAPHRASES)] + phrase, concept))
    attributes = {attribute_of(c) for c in erased}
    for attribute in sorted(attributes):
        for other in ATTRIBUTES[attribute]:
            if other not in erased:
                suites["retained"] += [(p, other) for p in prompts_naming(other, WORDS[other])[::3]]
    return {
        name: [Prompt(i, prompt, seed + 1000 * i, concept) for i, (prompt, concept) in enumerate(rows)]
        for name, rows in suites.items()
    }

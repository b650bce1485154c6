"""Prompt suites: rows of (case_number, prompt, evaluation_seed, concept), as in peers' CSVs.

``concept`` is the label: the concept the evaluator should (or, after erasure, should no
longer) see in the image. Peers' files name the label column ``concept``, ``class``, ``artist``
or ``label``; I2P-format files (nudity) have none, and the protocol gives every row its label.
The seed column is ``evaluation_seed`` (``sd_seed`` in I2P files). Each row is generated
``images_per_prompt`` times with seeds ``evaluation_seed + k``.

Suites of a run: ``target`` (prompts naming an erased concept), ``synonym`` (paraphrases and
synonyms), ``retained`` (prompts naming other concepts) and ``fidelity`` (prompts with no label,
e.g. COCO captions, for CLIP score and KID only).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from erasure.io import atomic_write_text

LABEL_COLUMNS = ("concept", "class", "artist", "label")
PROMPT_COLUMNS = ("prompt", "caption")
SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")


@dataclass(frozen=True)
class Prompt:
    case_number: int
    prompt: str
    evaluation_seed: int
    concept: str


def _first(options: Sequence[str], columns: Sequence[str]) -> str | None:
    return next((c for c in options if c in columns), None)


def load_csv(path: Path, label: str | None = None, seeds_required: bool = True) -> list[Prompt]:
    """Read a peers'-format prompt CSV.

    ``label``: every row's concept (for files without a label column, e.g. I2P); otherwise the
    label column is required. Without a seed column (``seeds_required=False``, e.g. COCO
    captions) a row's seed is its case number.
    """
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            prompt, seed = _first(PROMPT_COLUMNS, columns), _first(SEED_COLUMNS, columns)
            label_column = _first(LABEL_COLUMNS, columns)
            missing = ([] if prompt else ["prompt"]) + ([] if seed or not seeds_required else ["evaluation_seed"])
            missing += [] if label_column or label is not None else ["one of " + "/".join(LABEL_COLUMNS)]
            if missing:
                raise ValueError(f"prompt file {path} lacks the column(s) {', '.join(missing)}; expected case_number, "
                                 "prompt, evaluation_seed and a label column")
            rows = []
            for i, row in enumerate(reader):
                case = int(float(row.get("case_number") or i))
                rows.append(Prompt(case, row[prompt], int(float(row[seed])) if seed else case,
                                   label if label is not None else row[label_column]))
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read prompt file {path}: {error}") from None
    except (TypeError, ValueError) as error:
        if str(error).startswith("prompt file"):
            raise
        raise ValueError(f"prompt file {path} has a malformed row ({str(error).splitlines()[0]}); "
                         "case_number and seeds must be integers") from None
    if not rows:
        raise ValueError(f"prompt file {path} has no rows")
    return rows


def write_table(path: Path, rows: Sequence[dict]) -> None:
    """Rows of dicts as a CSV file (columns in order of first appearance), written atomically."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(path), buffer.getvalue())


def write_csv(prompts: list[Prompt], path: Path) -> None:
    write_table(path, [{"case_number": p.case_number, "prompt": p.prompt, "evaluation_seed": p.evaluation_seed,
                        "concept": p.concept} for p in prompts])


def templated_suite(templates: Sequence[str], concepts: Sequence[str], seed: int = 0) -> list[Prompt]:
    """One row per (concept, template), ``template.format(concept=...)``, seeds ``seed + 1000 i``."""
    rows = [(t.format(concept=c), c) for c in concepts for t in templates]
    return [Prompt(i, prompt, seed + 1000 * i, concept) for i, (prompt, concept) in enumerate(rows)]

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
import math
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
    captions) a row's seed is its case number. Anything else is a one-line ValueError naming the file,
    the line and the fix: an unreadable or non-UTF-8 file, no header or no rows, a missing column, a row
    with more or fewer fields than the header (an unquoted comma in a prompt), an empty prompt or label,
    a case number or seed that is not a whole number, a case number given twice.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return read_rows(path, csv.DictReader(handle), label, seeds_required)
    except UnicodeDecodeError:
        raise ValueError(f"prompt file {path} is not UTF-8 text; save it as UTF-8 (CSV UTF-8)") from None
    except csv.Error as error:
        raise ValueError(f"prompt file {path} is not a readable CSV ({error}); check its quoting") from None
    except OSError as error:
        raise ValueError(f"cannot read prompt file {path}: {error.strerror or error}; give the path of a "
                         "readable CSV") from None


def read_rows(path: Path, reader: csv.DictReader, label: str | None, seeds_required: bool) -> list[Prompt]:
    """The rows of an open :func:`load_csv` reader, checked."""
    columns = reader.fieldnames or []
    if not columns:
        raise ValueError(f"prompt file {path} is empty; it needs a header (case_number, prompt, evaluation_seed, "
                         "and a label column) and rows")
    prompt, seed = _first(PROMPT_COLUMNS, columns), _first(SEED_COLUMNS, columns)
    label_column = _first(LABEL_COLUMNS, columns)
    missing = ([] if prompt else ["prompt"]) + ([] if seed or not seeds_required else ["evaluation_seed"])
    missing += [] if label_column or label is not None else ["one of " + "/".join(LABEL_COLUMNS)]
    if missing:
        raise ValueError(f"prompt file {path} lacks the column(s) {', '.join(missing)} (its header: "
                         f"{', '.join(columns)}); expected case_number, prompt, evaluation_seed and a label column")
    rows, seen = [], {}
    for i, row in enumerate(reader):
        line = reader.line_num
        if None in row or None in row.values():
            fields = len(columns) + len(row[None]) if None in row else sum(v is not None for v in row.values())
            raise ValueError(f"prompt file {path}, line {line}: {fields} fields where the header has {len(columns)}; "
                             "quote a prompt that holds a comma (\"a cat, sitting\")")
        case = whole_number(row.get("case_number") or str(i), "case_number", path, line)
        if case in seen:
            raise ValueError(f"prompt file {path}, line {line}: case_number {case} is also on line {seen[case]}; "
                             "give each row its own case_number")
        seen[case] = line
        text = row[prompt]
        concept = label if label is not None else row[label_column]
        if not text.strip() or (label is None and not concept.strip()):
            raise ValueError(f"prompt file {path}, line {line}: an empty {'prompt' if not text.strip() else label_column}; "
                             "every row needs one")
        rows.append(Prompt(case, text, whole_number(row[seed], seed, path, line) if seed else case, concept))
    if not rows:
        raise ValueError(f"prompt file {path} has a header but no rows")
    return rows


def whole_number(text: str, column: str, path: Path, line: int) -> int:
    """A CSV cell as an integer (``12`` or ``12.0``), or a one-line ValueError naming the cell."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"prompt file {path}, line {line}: {column} {text!r} is not a whole number; "
                         f"write {column} as an integer")
    return int(value)


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

"""Run artifacts people look at: labelled image grids and ``report.md``."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from erasure.io import atomic_save, atomic_write_text
from evaluation.metrics import INTERVAL

SCALE = 3  # toy images are 32 px: enlarge them so they can be seen


def image_grid(row_labels: list[str], rows: list[list[torch.Tensor]], path: Path, headers: list[str] | None = None,
               gap_after: int | None = None) -> None:
    """A labelled grid of uint8 images (H, W, 3): a label left of each row, an optional header over
    each column (wrapped to two lines), an optional gap after column ``gap_after``."""
    size = rows[0][0].shape[0] * SCALE if rows[0][0].shape[0] < 128 else rows[0][0].shape[0]
    font = ImageFont.load_default()
    label_width = 8 + max(int(font.getlength(label)) for label in row_labels)
    pad, gap, header = 2, 16, 30 if headers else 4
    columns = max(len(row) for row in rows)

    def x_of(c: int) -> int:
        return label_width + c * (size + pad) + (gap if gap_after is not None and c >= gap_after else 0)

    canvas = Image.new("RGB", (x_of(columns) + pad, header + len(rows) * (size + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(headers or []):
        for line, part in enumerate((text[:18], text[18:36])):
            draw.text((x_of(c), 2 + 12 * line), part, fill="black", font=font)
    for r, (label, images) in enumerate(zip(row_labels, rows)):
        y = header + r * (size + pad)
        draw.text((4, y + size // 2 - 6), label, fill="black", font=font)
        for c, image in enumerate(images):
            canvas.paste(Image.fromarray(image.numpy()).resize((size, size), Image.Resampling.NEAREST), (x_of(c), y))
    atomic_save(path, lambda staging: canvas.save(staging, format="png"))


def comparison_grid(prompts: list[str], original: torch.Tensor, erased: torch.Tensor, per_prompt: int,
                    path: Path, max_rows: int = 12, titles: tuple[str, str] = ("original", "erased")) -> None:
    """Rows = prompts, columns = seeds; the original model's images left, the erased model's right."""
    count = min(len(prompts), max_rows)
    rows = [[*original[r * per_prompt:(r + 1) * per_prompt], *erased[r * per_prompt:(r + 1) * per_prompt]]
            for r in range(count)]
    headers = [titles[0], *[""] * (per_prompt - 1), titles[1]]
    image_grid(prompts[:count], rows, path, headers, gap_after=per_prompt)


def format_metric(values: dict, name: str) -> str:
    """``0.030 [0.005, 0.153]``: a metric with its 95% interval where it has one; ``–`` where missing."""
    value, interval = values.get(name), values.get(name + INTERVAL)
    if value is None:
        return "–"
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    return f"{text} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else text


def results_table(metrics: dict) -> str:
    """The run's headline metrics before and after erasure, with their 95% intervals, as console lines
    (the per-concept breakdowns are in ``report.md``)."""
    order = ("efficacy", "generality", "specificity", "fidelity")
    names = sorted((n for n in set(metrics["before"]) | set(metrics["after"])
                    if not n.endswith(INTERVAL) and n.count("/") == 1),
                   key=lambda n: (order.index(n.split("/")[0]) if n.split("/")[0] in order else len(order), n))
    width = max(len(n) for n in names) if names else 0
    cells = [(n, format_metric(metrics["before"], n), format_metric(metrics["after"], n)) for n in names]
    column = max([len("before"), *(len(before) for _, before, _ in cells)])
    return "\n".join([f"{'':<{width}}  {'before':<{column}}  after",
                      *(f"{n:<{width}}  {before:<{column}}  {after}" for n, before, after in cells)])


def write_report(path: Path, metrics: dict, protocol: dict, grids: dict[str, str]) -> None:
    """``report.md``: the protocol, the before/after table (95% Wilson intervals) and the sample grids."""
    names = sorted(n for n in set(metrics["before"]) | set(metrics["after"]) if not n.endswith(INTERVAL))
    lines = [
        f"# {metrics['recipe']}: erasing {', '.join(metrics['erase'])}", "",
        f"Method `{metrics['method']}` on `{metrics['model']}`.", "",
        "Accuracies are shares of images, with their 95% Wilson intervals in brackets.", "",
        "| metric | before | after |", "|---|---|---|",
        *[f"| {n} | {format_metric(metrics['before'], n)} | {format_metric(metrics['after'], n)} |" for n in names],
        "", f"Training {metrics['seconds']['fit']:.1f} s, evaluation {metrics['seconds']['eval']:.1f} s.", "",
        "## Protocol", "",
        *[f"- {key}: {value}" for key, value in protocol.items()], "",
        "## Samples", "",
        "Rows are prompts, columns seeds; the original model left, the erased model right.", "",
    ]
    for suite, file in grids.items():
        lines += [f"### {suite}", "", f"![{suite}]({file})", ""]
    atomic_write_text(path, "\n".join(lines))

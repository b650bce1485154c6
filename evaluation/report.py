"""Run artifacts people look at: labelled image grids and ``report.md``."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from erasure.io import atomic_save, atomic_write_text
from evaluation.metrics import INTERVAL

SCALE = 3  # toy images are 32 px: enlarge them so they can be seen


def comparison_grid(prompts: list[str], original: torch.Tensor, erased: torch.Tensor, per_prompt: int,
                    path: Path, max_rows: int = 12, titles: tuple[str, str] = ("original", "erased")) -> None:
    """Rows = prompts, columns = seeds; the original model's images left, the erased model's right."""
    rows = min(len(prompts), max_rows)
    size = original.shape[1] * SCALE if original.shape[1] < 128 else original.shape[1]
    font = ImageFont.load_default()
    label_width = 8 + max(int(font.getlength(p)) for p in prompts[:rows])
    gap, pad, header = 16, 2, 18
    width = label_width + 2 * per_prompt * (size + pad) + gap
    canvas = Image.new("RGB", (width, header + rows * (size + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for block, title in enumerate(titles):
        draw.text((label_width + block * (per_prompt * (size + pad) + gap), 2), title, fill="black", font=font)
    for r in range(rows):
        y = header + r * (size + pad)
        draw.text((4, y + size // 2 - 6), prompts[r], fill="black", font=font)
        for block, images in enumerate((original, erased)):
            for k in range(per_prompt):
                image = Image.fromarray(images[r * per_prompt + k].numpy()).resize((size, size), Image.Resampling.NEAREST)
                canvas.paste(image, (label_width + block * (per_prompt * (size + pad) + gap) + k * (size + pad), y))
    atomic_save(path, lambda staging: canvas.save(staging, format="png"))


def format_metric(values: dict, name: str) -> str:
    """``0.030 [0.005, 0.153]``: a metric with its 95% interval where it has one; ``–`` where missing."""
    value, interval = values.get(name), values.get(name + INTERVAL)
    if value is None:
        return "–"
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    return f"{text} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else text


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

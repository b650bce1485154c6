"""The comparison's artifacts: table (CSV and Markdown), bar chart, image grid, analysis plots and
``report.md``. Inputs are plain data (rows of metrics, images, curves), so every figure can be
rebuilt from a comparison directory's CSV files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from erasure.io import atomic_save, atomic_write_text  # noqa: E402
from evaluation.metrics import INTERVAL, KID, SUITE_METRICS, intervals_overlap  # noqa: E402
from evaluation.suites import write_table  # noqa: E402

KEY_METRICS = list(SUITE_METRICS.values())


def _cell(value) -> str:
    if value is None or value == "":
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def best_rows(rows: Sequence[dict], metric: str) -> dict | None:
    """The erased model's row with the best value of an accuracy (lowest target/synonym, highest retained)."""
    candidates = [row for row in rows[1:] if row.get(metric) is not None]
    if not candidates:
        return None
    lower_is_better = metric != SUITE_METRICS["retained"]
    return (min if lower_is_better else max)(candidates, key=lambda row: row[metric])


def metrics_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """The comparison table: accuracies as ``value [low, high]``; ``≈`` marks a value whose 95% interval
    overlaps the interval of the column's best method (not distinguishable from it at this sample size)."""
    best = {c: best_rows(rows, c) for c in columns if c in KEY_METRICS}
    formatted = []
    for row in rows:
        cells = dict(row)
        for column in columns:
            interval = row.get(column + INTERVAL)
            if row.get(column) is None or not interval:
                continue
            cells[column] = f"{row[column]:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"
            leader = best.get(column)
            if leader is not None and row is not rows[0] and (
                    row is leader or intervals_overlap(interval, leader[column + INTERVAL])):
                cells[column] += " ≈"
        formatted.append(cells)
    return markdown_table(formatted, columns)


def metrics_chart(rows: Sequence[dict], path: Path) -> None:
    """Grouped bars: each suite's accuracy (after erasure) per method, with 95% intervals."""
    labels = [row["method"] for row in rows]
    figure, axis = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 3.6), dpi=110)
    metrics = [m for m in KEY_METRICS if any(row.get(m) is not None for row in rows)]
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        values = [row.get(metric) or 0.0 for row in rows]
        intervals = [row.get(metric + INTERVAL) or [v, v] for row, v in zip(rows, values)]
        errors = [[v - low for v, (low, _) in zip(values, intervals)], [high - v for v, (_, high) in zip(values, intervals)]]
        positions = [i + (k - (len(metrics) - 1) / 2) * width for i in range(len(rows))]
        axis.bar(positions, values, width, label=metric.split("/")[-1], yerr=errors, capsize=2,
                 error_kw={"linewidth": 0.8})
    axis.set_xticks(range(len(rows)), labels, rotation=25, ha="right", fontsize=8)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("share of images")
    axis.set_title("target, synonym, incidental: lower is better; retained: higher is better", fontsize=9)
    axis.legend(fontsize=8, ncols=len(metrics), loc="upper center", bbox_to_anchor=(0.5, -0.35))
    figure.tight_layout()
    atomic_save(path, lambda p: figure.savefig(p, format="png"))
    plt.close(figure)


def robustness_chart(rows: Sequence[dict], path: Path, fidelity: str = "specificity/retained_acc") -> None:
    """Robustness against fidelity, one point per method: the worst-case (highest) attack success
    rate over the attacks run against ``fidelity`` (retained accuracy by default), each attack's
    own rate as a small mark on the same vertical line."""
    attacks = sorted({k[len("robustness/"):-len("_asr")] for row in rows for k in row
                      if k.startswith("robustness/") and k.endswith("_asr")
                      and not k.endswith(("_pre_asr", "_random_asr"))})
    points = [(row, {a: row[f"robustness/{a}_asr"] for a in attacks if row.get(f"robustness/{a}_asr") is not None})
              for row in rows if row.get(fidelity) is not None]
    points = [(row, rates) for row, rates in points if rates]
    figure, axis = plt.subplots(figsize=(7.6, 4.6), dpi=110)
    markers = dict(zip(attacks, "ov^sDPX*"))
    # labels stacked beside their dots, in the order of the dots' heights, so near points stay readable
    ordered = sorted(points, key=lambda point: max(point[1].values()))
    for k, (row, rates) in enumerate(ordered):
        x, worst = row[fidelity], max(rates.values())
        for attack, rate in rates.items():
            axis.scatter(x, rate, s=14, marker=markers[attack], color="0.6", zorder=2)
        dot = axis.scatter(x, worst, s=60, zorder=3)
        axis.annotate(row["method"], (x, worst), xytext=(1.04, 0.04 + 0.92 * k / max(len(ordered) - 1, 1)),
                      textcoords="axes fraction", fontsize=7, color=dot.get_facecolor()[0],
                      arrowprops={"arrowstyle": "-", "color": dot.get_facecolor()[0], "linewidth": 0.6})
    for attack, marker in markers.items():
        axis.scatter([], [], s=14, marker=marker, color="0.6", label=attack)
    lowest = min((row[fidelity] for row, _ in points), default=0.0)
    axis.set_xlim(max(0.0, lowest - 0.1), 1.02)
    axis.set_ylim(-0.02, 1.05)
    axis.set_xlabel(f"{fidelity.split('/')[-1]} (higher: the model keeps what it should)")
    axis.set_ylabel("attack success rate (dot: the strongest attack)")
    axis.set_title("robust and faithful erasers sit bottom right", fontsize=9)
    axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout(rect=(0, 0, 0.8, 1))
    atomic_save(path, lambda p: figure.savefig(p, format="png"))
    plt.close(figure)


def attention_chart(curves: dict[str, torch.Tensor], path: Path, title: str) -> None:
    """Attention mass on the concept tokens per denoising step, one line per curve."""
    figure, axis = plt.subplots(figsize=(7.0, 3.8), dpi=110)
    for label, curve in curves.items():
        steps = torch.arange(1, len(curve) + 1)
        axis.plot(steps, curve, label=label, linewidth=2.2 if label == "plain prompt" else 1.3,
                  linestyle="-" if label == "plain prompt" or label.startswith("base") else "--")
    axis.set_xlabel("denoising step")
    axis.set_ylabel("attention mass on concept tokens")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    atomic_save(path, lambda p: figure.savefig(p, format="png"))
    plt.close(figure)


def probe_chart(probes: Sequence[dict], retrieval: Sequence[dict], path: Path, concept: str) -> None:
    """The seed study's two questions side by side: per condition the share of images showing the concept
    (naming and incidental prompts, 95% intervals), and per text CLIP's preference for the image without it."""
    rows = [r for r in probes if r["concept"] == concept]
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    figure, (left, right) = plt.subplots(1, 2, figsize=(12.5, 0.28 * len(conditions) + 1.6), dpi=110,
                                         gridspec_kw={"width_ratios": [1.3, 1]})
    for offset, suite in ((-0.2, "naming"), (0.2, "incidental")):
        shares = {r["condition"]: r for r in rows if r["suite"] == suite}
        y = [k + offset for k, c in enumerate(conditions) if c in shares]
        values = [shares[c]["shows_concept"] for c in conditions if c in shares]
        errors = [[v - shares[c]["shows_concept_ci95"][0] for c, v in zip([c for c in conditions if c in shares], values)],
                  [shares[c]["shows_concept_ci95"][1] - v for c, v in zip([c for c in conditions if c in shares], values)]]
        left.barh(y, values, height=0.38, xerr=errors, label=f"{suite} prompts", capsize=2)
    left.set_yticks(range(len(conditions)), conditions, fontsize=7)
    left.invert_yaxis()
    left.set_xlim(0, 1.05)
    left.set_xlabel(f"share of images showing '{concept}' (the judge)")
    left.set_title("does the generator follow the instruction?", fontsize=9)
    left.legend(fontsize=7)
    texts = [r for r in retrieval if r["concept"] == concept]
    labels = [f"{r['text']} ({r['prompts']})" for r in texts]
    right.barh(range(len(texts)), [r["prefers_without_concept"] for r in texts], height=0.6, color="tab:green")
    right.axvline(0.5, color="grey", linewidth=0.8, linestyle="--")
    right.set_yticks(range(len(texts)), labels, fontsize=7)
    right.invert_yaxis()
    right.set_xlim(0, 1)
    right.set_xlabel(f"CLIP prefers the render without '{concept}'")
    right.set_title("does the text encoder understand it?", fontsize=9)
    figure.tight_layout()
    atomic_save(path, lambda p: figure.savefig(p, format="png"))
    plt.close(figure)


def metric_rows(runs: Sequence[tuple[str, dict]]) -> list[dict]:
    """One row per run: every metric after erasure, the original model's row first."""
    first = runs[0][1]
    # the original model's KID would compare it with itself
    before = {k: v for k, v in first["before"].items() if k != KID}
    rows = [{"method": "original model", "recipe": "", **before, "fit_s": None, "eval_s": None}]
    for label, metrics in runs:
        rows.append({"method": label, "recipe": metrics["recipe"], **metrics["after"],
                     "fit_s": metrics["seconds"]["fit"], "eval_s": metrics["seconds"]["eval"]})
    return rows


def table_columns(rows: Sequence[dict]) -> list[str]:
    names = list(dict.fromkeys(k for row in rows for k in row if "/" in k and not k.endswith(INTERVAL)))
    ordered = [m for m in (*KEY_METRICS, KID) if m in names] + [m for m in names if m not in (*KEY_METRICS, KID)]
    return ["method", *ordered, "fit_s", "eval_s"]


def write_report(output: Path, rows: list[dict], protocol: dict, analysis: dict, runs, attack_budget: str = "") -> None:
    columns = table_columns(rows)
    write_table(output / "comparison.csv", rows)
    table = metrics_table(rows, columns)
    atomic_write_text(output / "comparison.md", table + "\n")
    metrics_chart(rows[1:], output / "metrics.png")
    if attack_budget:
        robustness_chart(rows[1:], output / "robustness.png")
    text_columns = ["concept", "template", "pooled", "concept_token", "delta_pooled", "delta_concept_token"]
    lines = [
        f"# Comparison: erasing {', '.join(runs[0][1].config.concept)}", "",
        "Every method is scored by the same evaluation callback on the same prompt suites, seeds and sampler.", "",
        "## Protocol", "", *[f"- {key}: {value}" for key, value in protocol.items()],
        *[f"- {label}: `{path}`" for label, _, path in runs], "",
        "## Metrics", "", "After erasure (the original model's row: before). Accuracies are shares of images in which "
        "the evaluator sees the concept, with 95% Wilson intervals; target and synonym lower is better, retained "
        "higher is better; ≈ marks a method whose interval overlaps the best method's (no difference at this number "
        "of images). KID between the original and the erased model's retained images (same prompts and seeds).", "",
        table, "",
        "![metrics](metrics.png)", "",
        *(["Robustness: `robustness/<attack>_asr` is the attack success rate, the share of the attacked target "
            "prompts' images in which the evaluator sees the concept again (`evaluation.attacks`; budget: "
            f"{attack_budget}). `<attack>_pre_asr` is the share before the attack's search (UnlearnDiffAtk's pre-attack "
            "success; the attacks that count the concept at any checkpoint of their search, unlearndiffatk, pez and "
            "embedding, never fall below it). `<attack>_random_asr` is a search's random control: as many judged images "
            "from random prefixes or prompts, so the difference is what the search adds over trying.", "", "![robustness against fidelity](robustness.png)", ""] if attack_budget else []),
        "## Text-encoder similarity (instruction templates)", "",
        "Cosine similarity between the plain prompt and its rewrite: pooled = the text encoder's pooled output "
        "(end token); concept_token = the hidden state of the concept's token in the plain prompt vs every "
        "occurrence of the concept in the rewrite; delta = template minus the repetition control (the concept "
        "repeated, no instruction). `negative_prompt` leaves the conditional text unchanged and has no entry.", "",
        markdown_table(analysis["similarity"], text_columns), "",
        "## Cross-attention mass on the concept tokens", "",
        *(["Softmax attention of every `attn2` layer on the concept's token positions (all occurrences in the "
           "prompt the model receives), averaged over heads and spatial positions, conditional branch, per DDIM "
           "step; AUC over the normalised step axis; delta = AUC minus the plain prompt's on the base model.", "",
           markdown_table(analysis["auc"], ["concept", "curve", "auc", "delta_auc"]), "",
           *[f"![attention {c}]({chart})" for c, chart in analysis["charts"].items()], ""] if analysis["auc"] else []),
        *(["## Token ablation and image-text similarity: does the generator follow the instruction?", "",
           "Share of images (one seed per prompt) in which the judge sees the concept, 95% Wilson intervals, on prompts "
           "naming the concept and on incidental prompts that do not; each instruction template as written, with the "
           "concept's word removed from the instruction, and with every concept token's text state replaced by the empty "
           "prompt's; then each weight eraser on the plain prompts. clip_score_to_concept: mean 100 cos(image, "
           "\"a <concept>\"), delta to the plain prompt's.", "",
           markdown_table(analysis["probes"], ["concept", "suite", "condition", "shows_concept", "shows_concept_ci95",
                                               "clip_score_to_concept", "delta_clip_score"]), "",
           *[f"![probes {c}]({chart})" for c, chart in analysis.get("probe_charts", {}).items()], ""]
          if analysis["probes"] else []),
        *(["## Instruction retrieval: does the text encoder understand the instruction?", "",
           "Pairs of renders equal but for the concept (with it / without it): the share of pairs in which CLIP's "
           "text embedding of each text is nearer the image without the concept (0.5: it cannot tell; near 0: it "
           "asks for the concept; near 1: it excludes it).", "",
           markdown_table(analysis["retrieval"], ["concept", "text", "prompts", "prefers_without_concept",
                                                  "prefers_without_concept_ci95", "example"]), ""]
          if analysis["retrieval"] else []),
        *[f"- {reason}" for reason in analysis["skipped"]], "",
        "## Samples", "", "Rows: methods; columns: prompts (target then retained), one seed each.", "",
        "![grid](grid.png)", "",
    ]
    atomic_write_text(output / "report.md", "\n".join(lines))

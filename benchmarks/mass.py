"""The mass-erasure table: each recipe on ``protocol=mass`` at N = 1, 5, 10, 50, 100 compounds.

    python -m benchmarks.mass                                   # runs/mass/<recipe>-<N>/, benchmarks/mass.csv
    python -m benchmarks.mass --recipes uce speed --counts 1 10

Each cell is ``python -m erasure.train recipe=<recipe> protocol=mass evaluation.compounds=<N>`` (run in this
process; a finished run is read, not repeated); the table keeps the cells of earlier sweeps. ``mass.csv`` holds efficacy (target), generality (synonym),
neighbour and distant specificity with their 95% intervals, MACE's harmonic mean and the fit time;
``docs/mass_efficacy_specificity.png`` draws efficacy against neighbour specificity as N grows.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from erasure.config import load_config
from erasure.io import atomic_write_text
from erasure.runs import train

COUNTS = (1, 5, 10, 50, 100)
RECIPES = ("uce", "speed", "rece", "esd", "lora")
COLUMNS = ("efficacy/target_acc", "generality/synonym_acc", "specificity/neighbour_acc", "specificity/distant_acc",
           "summary/harmonic_mean")
RESULT = Path(__file__).with_name("mass.csv")


def run_cell(recipe: str, count: int, root: Path, overrides: list[str]) -> dict:
    run = root / f"{recipe}-{count}"
    if not (run / "metrics.json").is_file():
        train(load_config([f"recipe={recipe}", "protocol=mass", f"evaluation.compounds={count}", f"output_dir={run}",
                           "overwrite=true", *overrides]))
    metrics = json.loads((run / "metrics.json").read_text())
    row = {"recipe": recipe, "N": count, "fit_s": metrics["seconds"].get("fit")}
    for key in COLUMNS:
        for stage in ("before", "after"):
            value = metrics[stage].get(key)
            interval = metrics[stage].get(f"{key}_ci95")
            row[f"{stage} {key}"] = value if interval is None else f"{value:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def value(cell) -> float:
        return float(str(cell).split()[0])

    figure, axis = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        x = [1 - value(r["after efficacy/target_acc"]) for r in mine]
        y = [value(r["after specificity/neighbour_acc"]) for r in mine]
        axis.plot(x, y, marker="o", label=recipe)
        for r, a, b in zip(mine, x, y):
            axis.annotate(f"N={r['N']}", (a, b), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.set_xlabel("efficacy: 1 - share of erased compounds still drawn")
    axis.set_ylabel("neighbour specificity: kept compounds one value away")
    axis.set_xlim(-0.02, 1.02)
    axis.set_ylim(-0.02, 1.02)
    axis.legend(fontsize=8)
    axis.set_title("mass erasure on the toy world (protocol=mass)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mass", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--counts", nargs="+", type=int, default=list(COUNTS))
    parser.add_argument("--root", type=Path, default=Path("runs/mass"))
    parser.add_argument("--output", type=Path, default=RESULT)
    parser.add_argument("--figure", type=Path, default=Path("docs/mass_efficacy_specificity.png"))
    parser.add_argument("--draw", nargs="*", default=[], metavar="CSV[=LABEL]",
                        help="other tables whose cells the figure draws too (LABEL after the recipe's name), "
                             "where this table has no cell of that recipe and N")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_args(argv)
    rows = list(csv.DictReader(args.output.open())) if args.output.is_file() else []  # other cells are kept
    for recipe in args.recipes:
        for count in args.counts:
            cell = run_cell(recipe, count, args.root, args.overrides)
            rows = [r for r in rows if (r["recipe"], int(r["N"])) != (recipe, count)] + [cell]
            rows.sort(key=lambda r: (r["recipe"], int(r["N"])))
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(args.output, text.getvalue())  # after every cell: a stopped sweep keeps its rows
    plot(rows + drawn_too(rows, args.draw), args.figure)
    print(text.getvalue())


def drawn_too(rows: list[dict], tables: list[str]) -> list[dict]:
    """The cells of ``tables`` ("path" or "path=label") that ``rows`` lacks, the label appended to the recipe."""
    seen = {(r["recipe"], int(r["N"])) for r in rows}
    extra = []
    for table in tables:
        path, _, label = table.partition("=")
        for row in csv.DictReader(Path(path).open()):
            name = f"{row['recipe']} {label}".strip()
            if (name, int(row["N"])) not in seen:
                seen.add((name, int(row["N"])))
                extra.append({**row, "recipe": name})
    return extra


if __name__ == "__main__":
    main()

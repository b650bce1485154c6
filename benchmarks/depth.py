"""Depth against robustness: how strongly must a method erase before the erasure holds under attack?

    python -m benchmarks.depth                                  # the grid below, into runs/depth
    python -m benchmarks.depth --output runs/depth --attacks unlearndiffatk embedding relearn
    python -m benchmarks.depth --attack unlearndiffatk.timesteps=10   # a reduced TextGrad budget, named in depth.csv

Each setting of the grid (one method, its erasure strength turned down from the toy preset towards
paper-like gentleness) is trained and evaluated as ``python -m erasure.train`` does, then attacked
(``evaluation.attacks``, default budgets; ``--attack KEY=VALUE`` changes one, as ``attack.KEY=VALUE``
does for ``erasure.attack``); a finished run and its cached attack results are reused,
so an interrupted sweep continues where it stopped. Writes <output>/depth.csv (one row per
setting: target and retained accuracy, KID, each attack's success rate) and <output>/depth.png
(attack success against target accuracy, one line per method, ordered by strength).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib
from omegaconf import OmegaConf

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from erasure.config import ConfigError, load_config, merge_into_schema, parse_overrides  # noqa: E402
from erasure.io import atomic_save  # noqa: E402
from erasure.runs import attack_run, train  # noqa: E402
from evaluation.attacks import AttackConfig, AttackConfigError  # noqa: E402

CONCEPT = "circle"
# (method, label, overrides), strongest first within a method; no overrides: the recipe's default on
# the toy world. The others weaken the trained methods' defaults: ESD's lr and steps towards the paper's lr 1e-5, UCE's erase
# scale against its preserve term, Concept Ablation's steps; SLD (no training) its presets.
GRID = [
    ("esd", "lr 1e-3, 150 steps (toy preset, paper loop)", []),
    ("esd", "lr 3e-4, 150 steps", ["method.lr=3e-4"]),
    ("esd", "lr 1e-4, 150 steps", ["method.lr=1e-4"]),
    ("esd", "lr 1e-4, 50 steps", ["method.lr=1e-4", "trainer.max_steps=50"]),
    ("uce", "erase scale 1 (toy preset)", []),
    ("uce", "erase scale 0.3", ["method.erase_scale=0.3"]),
    ("uce", "erase scale 0.1", ["method.erase_scale=0.1"]),
    ("ablation", "150 steps (toy preset)", []),
    ("ablation", "50 steps", ["trainer.max_steps=50"]),
    ("ablation", "20 steps", ["trainer.max_steps=20"]),
    ("sld", "max preset", ["method.preset=max"]),
    ("sld", "strong preset", ["method.preset=strong"]),
    ("sld", "medium preset (default)", []),
]
ATTACKS = ("unlearndiffatk", "embedding", "relearn")
# every method in the loop its step counts were set for: ESD's and its settings' in the paper's (x_t
# sampled every step by the trained model; the toy preset's default is the x_t bank since it was measured)
LOOP = {"esd": ["method.sample_from=trained", "method.xt_bank=0"]}


def attack_config(options: list[str]) -> AttackConfig:
    """The attacks' budget: the defaults with each ``KEY=VALUE`` of ``options`` applied and checked."""
    overrides = parse_overrides(options)
    return OmegaConf.to_object(merge_into_schema(OmegaConf.structured(AttackConfig), overrides))


def run_setting(output: Path, method: str, overrides: list[str]) -> Path:
    """The run directory of one setting, trained and evaluated unless it already finished."""
    name = "-".join([method, *(o.split("=", 1)[0].split(".")[-1] + o.split("=", 1)[1] for o in overrides)]) \
        if overrides else f"{method}-preset"
    folder = output / "runs" / name
    if not (folder / "metrics.json").is_file():
        train(load_config([f"recipe={method}", f"concept=[{CONCEPT}]", f"output_dir={folder}", "overwrite=true",
                           *LOOP.get(method, []), *overrides]))
    return folder


def depth_chart(rows: list[dict], attacks: list[str], path: Path) -> None:
    """Attack success against target accuracy: one panel per attack, one line per method."""
    figure, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 3.8), dpi=110, squeeze=False)
    for axis, attack in zip(axes[0], attacks):
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            axis.plot([r["target_acc"] for r in mine], [r[f"{attack}_asr"] for r in mine], marker="o", label=method)
            for row in mine:
                if row["default"]:
                    axis.annotate("default", (row["target_acc"], row[f"{attack}_asr"]), fontsize=6,
                                  textcoords="offset points", xytext=(3, -8))
        axis.plot([0, 1], [0, 1], color="0.8", linewidth=0.8, linestyle=":")  # attack adds nothing
        axis.set_xlim(-0.03, 1.03)
        axis.set_ylim(-0.03, 1.03)
        axis.set_xlabel("target accuracy, unattacked (lower: erased deeper)")
        axis.set_ylabel("attack success rate")
        axis.set_title(attack, fontsize=9)
        axis.legend(fontsize=7)
    figure.suptitle(f"toy world, erase {CONCEPT}: above the dotted line the attack recovers the concept", fontsize=9)
    figure.tight_layout()
    atomic_save(path, lambda p: figure.savefig(p, format="png"))
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/depth"))
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--attack", action="append", default=[], metavar="KEY=VALUE",
                        help="an attack option (evaluation.attacks.AttackConfig), e.g. unlearndiffatk.timesteps=10")
    args = parser.parse_args(argv)
    try:
        config = attack_config(args.attack)
    except (ConfigError, AttackConfigError) as error:
        parser.error(str(error))
    rows = []
    for method, label, overrides in GRID:
        print(f"== {method}: {label}", flush=True)
        folder = run_setting(args.output, method, overrides)
        metrics = json.loads((folder / "metrics.json").read_text())["after"]
        results = attack_run(folder, args.attacks, config)
        rows.append({"method": method, "setting": label, "default": not overrides, "run": str(folder),
                     "target_acc": metrics["efficacy/target_acc"], "retained_acc": metrics["specificity/retained_acc"],
                     "kid": metrics.get("fidelity/kid"),
                     **{f"{a}_asr": results[a]["attack_success_rate"] for a in args.attacks},
                     "attack_options": " ".join(args.attack)})
    args.output.mkdir(parents=True, exist_ok=True)
    with (args.output / "depth.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    depth_chart(rows, args.attacks, args.output / "depth.png")
    for row in rows:
        print(" | ".join(str(v) for k, v in row.items() if k != "run"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

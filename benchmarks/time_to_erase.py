"""Time to erase: training seconds until the erased model passes the bar, for each training loop.

    python -m benchmarks.time_to_erase                     # every loop below, into runs/time_to_erase
    python -m benchmarks.time_to_erase --only esd --every 10

Each loop trains the toy world's recipe (``python -m erasure.train recipe=<method> concept=[circle]``
with the loop's options) and runs the run's whole evaluation protocol every ``--every`` steps
(``evaluation.every_n_steps``; the same prompts, seeds and sampler as the final evaluation; its
time is not counted). The time to erase is the training time before the first evaluation at which

    target accuracy <= 0.10  and  retained accuracy >= its value before erasure - 0.03,

and the table gives the metrics there with their 95% Wilson intervals. The first loop of each
method is the paper-faithful one (ESD's: x_t sampled every step by the model being trained, as
the ESD paper) and the baseline of its method: ``speed_up`` is its time over the loop's, and
``within_baseline`` says whether target, synonym and retained accuracy at the loop's erase point
each lie inside the baseline's 95% interval at its erase point, or beyond it on the better side
(target and synonym lower, retained higher: an erasure at least as good). A finished run is reused, so an interrupted
benchmark continues where it stopped. Time it alone: a second PyTorch process on the machine makes
every figure meaningless.

Writes <output>/time_to_erase.csv and .md, and copies the table to benchmarks/time_to_erase.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
from pathlib import Path

import torch

from erasure.config import load_config
from erasure.runs import train
from evaluation.comparison import markdown_table

CONCEPT = "circle"
TARGET_BAR = 0.10
RETAINED_DROP = 0.03
PAPER_LOOP = ["method.sample_from=trained", "method.xt_bank=0"]
BANK_LOOP = ["method.sample_from=frozen", "method.xt_bank=16"]
# (method, loop, overrides): the first loop of each method is its baseline, today's paper loop at the
# values the toy preset had before the bank (LoRA: lr 1e-3); the others add what each change buys alone
LOOPS = [
    ("esd", "paper: x_t sampled by the trained model every step", PAPER_LOOP),
    ("esd", "x_t bank: 16 frozen trajectories (default)", BANK_LOOP),
    ("lora", "paper: x_t sampled by the trained model every step, lr 1e-3", [*PAPER_LOOP, "method.lr=1e-3"]),
    ("lora", "paper, lr 3e-3", [*PAPER_LOOP, "method.lr=3e-3"]),
    ("lora", "x_t bank: 16 frozen trajectories, lr 1e-3", [*BANK_LOOP, "method.lr=1e-3"]),
    ("lora", "x_t bank: 16 frozen trajectories, lr 3e-3 (default)", BANK_LOOP),
]
ACCURACIES = {"target": "efficacy/target_acc", "synonym": "generality/synonym_acc",
              "retained": "specificity/retained_acc"}
LOWER_IS_BETTER = ("target", "synonym")


def erase_point(metrics: dict) -> dict | None:
    """The first evaluation of the run's history that passes the bar (None: none did)."""
    floor = metrics["before"][ACCURACIES["retained"]] - RETAINED_DROP
    return next((entry for entry in metrics["history"]
                 if entry[ACCURACIES["target"]] <= TARGET_BAR and entry[ACCURACIES["retained"]] >= floor - 1e-9), None)


def no_worse(name: str, value: float, interval: list[float]) -> bool:
    """``value`` is inside ``interval`` or beyond it on the better side of accuracy ``name``."""
    low, high = interval
    return value <= high if name in LOWER_IS_BETTER else value >= low


def run_loop(output: Path, method: str, overrides: list[str], every: int, max_steps: int) -> dict:
    """The loop's metrics.json, trained and evaluated unless a finished run is there."""
    folder = output / "runs" / "-".join([method, *(o.split("=", 1)[1] for o in overrides)])
    if not (folder / "metrics.json").is_file():
        train(load_config([f"recipe={method}", f"concept=[{CONCEPT}]", f"output_dir={folder}", "overwrite=true",
                           f"evaluation.every_n_steps={every}", f"trainer.max_steps={max_steps}", *overrides]))
    return json.loads((folder / "metrics.json").read_text())


def table_row(method: str, loop: str, metrics: dict, baseline: dict | None) -> dict:
    point = erase_point(metrics)
    row = {"method": method, "loop": loop, "steps_to_erase": point and point["step"],
           "time_to_erase_s": point and point["train_seconds"],
           "speed_up": None, "within_baseline": None,
           **{name: point and point[key] for name, key in ACCURACIES.items()},
           **{f"{name}_ci95": point and point[f"{key}_ci95"] for name, key in ACCURACIES.items()},
           "full_run": f"{metrics['history'][-1]['step']} steps, {metrics['seconds']['fit']} s"}
    if baseline is not None and point is not None and baseline["time_to_erase_s"]:
        row["speed_up"] = round(baseline["time_to_erase_s"] / point["train_seconds"], 1)
        row["within_baseline"] = all(no_worse(name, row[name], baseline[f"{name}_ci95"]) for name in ACCURACIES)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/time_to_erase"))
    parser.add_argument("--only", choices=sorted({method for method, _, _ in LOOPS}))
    parser.add_argument("--every", type=int, default=10, help="evaluate every N steps")
    parser.add_argument("--max-steps", type=int, default=200, help="train each loop for at most N steps")
    args = parser.parse_args(argv)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    rows, baselines = [], {}
    for method, loop, overrides in LOOPS:
        if args.only not in (None, method):
            continue
        print(f"== {method}: {loop}", flush=True)
        metrics = run_loop(args.output, method, overrides, args.every, args.max_steps)
        row = table_row(method, loop, metrics, baselines.get(method))
        baselines.setdefault(method, row)
        rows.append({"machine": machine, **row})
    args.output.mkdir(parents=True, exist_ok=True)
    with (args.output / "time_to_erase.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = markdown_table([{k: v for k, v in row.items() if k != "machine" and not k.endswith("_ci95")} for row in rows])
    (args.output / "time_to_erase.md").write_text(f"{machine}; bar: target <= {TARGET_BAR}, retained within "
                                                  f"{RETAINED_DROP} of before; evaluated every {args.every} steps\n\n"
                                                  f"{text}\n")
    shutil.copyfile(args.output / "time_to_erase.csv", Path(__file__).with_name("time_to_erase.csv"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

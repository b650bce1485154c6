"""Sweep any keys of a training run and tabulate every run's metrics.

    python -m erasure.sweep recipe=esd method.lr=1e-4,5e-4,1e-3 concept=circle,star output_dir=runs/sweep
    python -m erasure.sweep recipe=esd method.lr=1e-4,1e-3 launcher.cluster=local launcher.parallel=2
    python -m erasure.sweep recipe=lora method.rank=4,8,16 launcher.cluster=local launcher.parallel=8 launcher.gpus_per_job=1
    python -m erasure.sweep recipe=esd method.lr=1e-5,3e-5 launcher.cluster=slurm launcher.slurm_partition=gpu launcher.gpus_per_job=1

A value with commas (outside brackets and quotes) is a sweep axis: the runs are every combination
of the axes' values, each ``python -m erasure.train`` with the other keys as given
(``concept=[circle,star]`` is one run erasing both). Every run is checked before any starts;
each writes <output_dir>/runs/<name>/ (a finished one is reused, so an interrupted sweep
continues), and <output_dir>/sweep.csv and sweep.md hold one row per run: its swept values,
its metrics after erasure and its fit seconds. Runs go through ``erasure.launch`` (``launcher.*``:
inline, local processes or SLURM).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import sys
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from erasure.cli import run_command
from erasure.config import ConfigError, load_config, merge_into_schema, parse_overrides
from erasure.launch import LaunchConfig, check_launcher, launch
from erasure.io import atomic_write_text
from evaluation.comparison import markdown_table
from evaluation.suites import write_table

log = logging.getLogger(__name__)

REPORTED = ("efficacy/target_acc", "generality/synonym_acc", "specificity/retained_acc", "fidelity/kid")


def split_axis(value: str) -> list[str]:
    """``value`` split at the commas outside brackets and quotes (one item: not an axis)."""
    items, depth, quote, current = [], 0, None, ""
    for char in value:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        current += char
    return [*items, current]


def launcher_options(arguments: list[str]) -> tuple[LaunchConfig, list[str]]:
    """(the ``launcher.*`` options, the other arguments)."""
    mine = [a for a in arguments if a.startswith("launcher.")]
    given = parse_overrides(mine).get("launcher", {}) if mine else {}
    config = OmegaConf.to_object(merge_into_schema(OmegaConf.structured(LaunchConfig), given, prefix="launcher."))
    check_launcher(config)
    return config, [a for a in arguments if not a.startswith("launcher.")]


def run_name(values: dict[str, str]) -> str:
    """A folder name for one combination: key=value pairs with the key's last part, filesystem-safe."""
    text = "-".join(f"{key.split('.')[-1]}={value}" for key, value in values.items())
    return re.sub(r"[^\w.=+-]+", "_", text).strip("_") or "run"


def plan(arguments: list[str]) -> tuple[list[tuple[dict[str, str], list[str], Path]], LaunchConfig, Path]:
    """Every run's (swept values, train arguments, run folder), checked; the launcher options; the sweep folder."""
    launcher, arguments = launcher_options(arguments)
    fixed, axes = [], {}
    for argument in arguments:
        key, _, value = argument.partition("=")
        items = split_axis(value) if "=" in argument else [value]
        if key in ("output_dir", "resume"):
            continue
        if len(items) > 1:
            if any(not item.strip() for item in items):
                raise ConfigError(f"'{key}' has an empty value in its sweep {value!r}; e.g. {key}=1e-4,1e-3")
            axes[key] = items
        else:
            fixed.append(argument)
    if not axes:
        raise ConfigError("nothing to sweep; give a key several values, e.g. method.lr=1e-4,5e-4,1e-3")
    given_output = next((a.split("=", 1)[1] for a in arguments if a.startswith("output_dir=")), None)
    output = Path(given_output or f"runs/sweep/{datetime.now():%Y%m%d-%H%M%S}")
    runs = []
    for combination in itertools.product(*axes.values()):
        values = dict(zip(axes, combination))
        folder = output / "runs" / run_name(values)
        run_arguments = [*fixed, *(f"{k}={v}" for k, v in values.items()), f"output_dir={folder}"]
        load_config(run_arguments)  # every run checked before any starts
        runs.append((values, run_arguments, folder))
    return runs, launcher, output


def sweep(arguments: list[str]) -> Path:
    runs, launcher, output = plan(arguments)
    todo = [k for k, (_, _, folder) in enumerate(runs) if not (folder / "metrics.json").is_file()]
    log.info(f"sweep: {len(runs)} runs ({len(runs) - len(todo)} finished before), launcher {launcher.cluster}, "
             f"{launcher.parallel} at once -> {output}")
    commands = [[*runs[k][1], f"overwrite={runs[k][2].exists()}"] for k in todo]
    codes = dict(zip(todo, launch(commands, launcher, output)))
    rows = []
    for k, (values, _, folder) in enumerate(runs):
        row = {"run": folder.name, **values}
        if (folder / "metrics.json").is_file():
            metrics = json.loads((folder / "metrics.json").read_text())
            row.update({key: metrics["after"].get(key) for key in REPORTED})
            row["fit_s"] = metrics["seconds"]["fit"]
        else:
            row["failed"] = f"exit {codes.get(k)}; see {folder}"
        rows.append(row)
    write_table(output / "sweep.csv", rows)
    atomic_write_text(output / "sweep.md", markdown_table(rows) + "\n")
    print(markdown_table(rows))
    failed = [row["run"] for row in rows if "failed" in row]
    if failed:
        raise SweepFailed(f"{len(failed)} of {len(rows)} runs failed ({', '.join(failed)}); their logs are in their "
                          f"folders and {output / 'launcher'}")
    return output


class SweepFailed(RuntimeError):
    """Some runs of a sweep did not finish."""


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__, sweep, argv, {SweepFailed: (1, "error")})


if __name__ == "__main__":
    sys.exit(main())

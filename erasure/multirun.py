"""Multirun: ``-m`` sweeps of training runs through Hydra's sweepers and launchers, one table of every run.

    python -m erasure.train -m recipe=esd method.lr=1e-4,5e-4,1e-3 concept=circle,star output_dir=runs/sweep
    python -m erasure.train -m recipe=esd method.lr=1e-5,1e-4,1e-3 hydra/launcher=submitit_local \\
        hydra.sweeper.max_batch_size=2                                     # 2 local processes at a time
    python -m erasure.train -m recipe=esd model.path=/models/sd-v1-5 method.lr=1e-5,3e-5 \\
        hydra/launcher=submitit_slurm hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1
    python -m erasure.train -m recipe=esd hydra/sweeper=optuna hydra.sweeper.n_trials=8 \\
        "method.lr=tag(log,interval(1e-4,3e-3))" "trainer.max_steps=range(50,201,50)" "method.eta=interval(0.5,2)"

The overrides are Hydra's grammar: ``a,b,c``, ``range()``, ``choice()``, ``interval()`` and ``tag(log, ...)``
sweep a key (quote a value that holds a comma: ``concept="a, b"``); ``hydra/launcher=`` chooses the launcher
(basic, one after another, by default; ``submitit_local``, ``submitit_slurm``, ``joblib``, ``ray`` where
installed) and ``hydra/sweeper=`` the sweeper (the grid by default; ``optuna``). Each run is
``erasure.train`` with that run's overrides: its config goes through the same layers and checks and keeps its
``sources``, and every run of a grid is checked before any starts. Runs are written to
<output_dir>/runs/<swept key=value,...>/; a finished run is reused, so an interrupted sweep continues.

At the end, :class:`RunTable` (a Hydra callback) writes <output_dir>/multirun.csv and multirun.md (one row per
run: its swept values, its metrics after erasure, its fit seconds) and the Pareto front of target accuracy
(lower is better) against retained accuracy (higher is better): pareto.csv, pareto.md and pareto.png. Under
``hydra/sweeper=optuna`` those two figures are the objectives (directions minimize, maximize; the NSGA-II
sampler unless another is chosen), so an Optuna search tunes an eraser to a model.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from erasure.config import ConfigError, load_config
from erasure.io import atomic_save, atomic_write_text
from evaluation.comparison import markdown_table
from evaluation.suites import write_table

log = logging.getLogger(__name__)

PRIMARY = "erasure_multirun"  # the primary config's name in Hydra's ConfigStore
TARGET, RETAINED = "efficacy/target_acc", "specificity/retained_acc"  # the objectives: down, up
REPORTED = (TARGET, "generality/synonym_acc", RETAINED, "fidelity/kid")
LOCAL_LAUNCHERS = ("submitit_local",)  # launchers whose runs share this machine's cores
QUIET_LOGGING = ("hydra/job_logging=disabled", "hydra/hydra_logging=disabled")  # the console is erasure.cli's


class SweepFailed(RuntimeError):
    """Some runs of a multirun did not finish."""


def parse(arguments: list[str]) -> list:
    """Hydra's overrides of ``arguments``, or a one-line ConfigError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(arguments)
    except HydraException as error:
        raise ConfigError(f"cannot parse the overrides: {str(error).splitlines()[0]}; quote a value that holds "
                          "a comma or brackets, e.g. concept=\"a, b\"") from None


def is_interval(override) -> bool:
    """Whether ``override`` is Optuna's ``interval()`` (a search range, no values to list)."""
    from hydra.core.override_parser.types import IntervalSweep

    return override.is_sweep_override() and isinstance(override.value(), IntervalSweep)


def values_to_check(override) -> list[str]:
    """The ``key=value`` arguments a sweep override stands for: every value of a list, range or choice; the
    two ends of an interval."""
    key = override.get_key_element()
    if not override.is_sweep_override():
        return [override.input_line]
    if is_interval(override):
        return [f"{key}={override.value().start}", f"{key}={override.value().end}"]
    return [f"{key}={value}" for value in override.sweep_string_iterator()]


@dataclass
class Plan:
    """A checked multirun: the run overrides, Hydra's own, the sweep folder, how many runs a grid has, the
    keys given one value, and the first run's resolved config."""

    runs: list[str]
    hydra: list[str]
    output: Path
    count: int
    fixed_keys: list[str]
    first: DictConfig


def plan(arguments: list[str]) -> Plan:
    """The multirun ``arguments`` describe, every run of a grid checked before any starts."""
    if any(a.startswith("launcher.") for a in arguments):
        raise ConfigError("launcher.* belongs to erasure.compare; a multirun takes hydra/launcher=submitit_local "
                          "(or submitit_slurm, joblib) and hydra.sweeper.max_batch_size=<runs at a time>")
    hydra = [a for a in arguments if a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    output_given = [a.split("=", 1)[1] for a in arguments if a.startswith("output_dir=")]
    runs = [a for a in arguments if a not in hydra and not a.startswith(("output_dir=", "overwrite=", "resume="))]
    overrides = parse(runs)
    optuna = any(a.split("=", 1)[-1] == "optuna" for a in hydra if a.startswith("hydra/sweeper="))
    if not optuna and not any(o.is_sweep_override() for o in overrides):
        raise ConfigError("nothing to sweep; give a key several values, e.g. method.lr=1e-4,5e-4,1e-3, "
                          "or search with hydra/sweeper=optuna")
    interval = next((o for o in overrides if is_interval(o)), None)
    if interval is not None and not optuna:
        raise ConfigError(f"'{interval.get_key_element()}': interval() is for hydra/sweeper=optuna; "
                          "a grid takes a list, range() or choice()")
    output = Path(output_given[-1] if output_given else f"runs/multirun/{datetime.now():%Y%m%d-%H%M%S}")
    combinations = [list(c) for c in itertools.product(*(values_to_check(o) for o in overrides))]
    configs = [load_config([*combination, f"output_dir={output / 'runs' / 'check'}"]) for combination in combinations]
    fixed = [o.get_key_element() for o in overrides if not o.is_sweep_override()]
    return Plan(runs, hydra, output, len(combinations), fixed, configs[0])


def primary_config(first: DictConfig) -> dict:
    """The config Hydra applies each run's overrides to: the first run's resolved config (so Hydra knows
    every key), and Hydra's settings for a multirun of ``erasure.train``."""
    config = OmegaConf.to_container(first)
    config.pop("sources")
    config["concept"] = None  # any form of concept (a word or a list) may be swept
    config["output_dir"] = None  # each run's is its Hydra job folder
    config["hydra"] = {"callbacks": {"run_table": {"_target_": f"{__name__}.RunTable"}}, "output_subdir": None}
    return config


def hydra_settings(plan: Plan) -> list[str]:
    """Hydra's overrides for the multirun: run folders named by the swept keys alone, the console left to
    :mod:`erasure.cli`, for Optuna the two objectives, and for local processes the CPU cores shared out
    (``cpus_per_task``: cores / runs at a time, each run's torch threads)."""
    hydra, count = plan.hydra, plan.count
    given = {a.split("=", 1)[0]: a.split("=", 1)[-1] for a in hydra}
    settings = [f"hydra.sweep.dir={plan.output}", "hydra.sweep.subdir=runs/${hydra.job.override_dirname}",
                f"hydra.job.config.override_dirname.exclude_keys=[{','.join(plan.fixed_keys)}]",
                *(s for s in QUIET_LOGGING if s.split("=")[0] not in given)]
    if given.get("hydra/launcher") in LOCAL_LAUNCHERS and "hydra.launcher.cpus_per_task" not in given:
        at_once = int(given.get("hydra.sweeper.max_batch_size", given.get("hydra.sweeper.n_jobs", count)))
        settings.append(f"hydra.launcher.cpus_per_task={max(1, (os.cpu_count() or 1) // max(1, min(at_once, count)))}")
    if "hydra/sweeper=optuna" in hydra:
        settings += [s for s in ("hydra.sweeper.direction=[minimize,maximize]", "hydra/sweeper/sampler=nsgaii")
                     if s.split("=")[0] not in given]
    return [*settings, *hydra]


def check_hydra(overrides: list[str]) -> None:
    """Compose Hydra's config once with these overrides: a bad launcher, sweeper or key is a one-line error."""
    from hydra import compose, initialize
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize(version_base="1.3", config_path=None):
            compose(PRIMARY, overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"{str(error).splitlines()[0]}; see the hydra/launcher and hydra/sweeper choices in "
                          "python -m erasure.train --help") from None


def multirun(arguments: list[str]) -> Path:
    """Run the sweep ``arguments`` describe (``erasure.train -m``); returns the sweep folder."""
    import hydra
    from hydra.core.config_store import ConfigStore

    checked = plan(arguments)
    output = checked.output
    ConfigStore.instance().store(name=PRIMARY, node=primary_config(checked.first))
    settings = hydra_settings(checked)
    check_hydra(settings)
    log.info(f"multirun -> {output}")
    saved = sys.argv
    sys.argv = ["erasure.train", "--multirun", *settings, *checked.runs]
    try:
        hydra.main(version_base="1.3", config_path=None, config_name=PRIMARY)(run_job)()
    finally:
        sys.argv = saved
    table, rows = output / "multirun.csv", []
    with contextlib.suppress(FileNotFoundError), open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    failed = [row["run"] for row in rows if row.get("failed")]
    if not rows:
        raise SweepFailed(f"the multirun wrote no table ({table}); its errors are above")
    if failed:
        raise SweepFailed(f"{len(failed)} of {len(rows)} runs failed ({', '.join(failed)}); their errors are above "
                          f"and their folders in {output / 'runs'}")
    return output


def choices(group: str) -> list[str]:
    """The options of one of Hydra's config groups (``hydra/launcher``, ``hydra/sweeper``) installed here."""
    from hydra import initialize
    from hydra.core.global_hydra import GlobalHydra

    with initialize(version_base="1.3", config_path=None):
        return GlobalHydra.instance().config_loader().get_group_options(group)


def run_job(config: DictConfig) -> tuple[float, float]:
    """One run of the multirun, in whatever process the launcher gives it: ``erasure.train`` with the run's
    overrides into Hydra's job folder (reused once finished); returns (target, retained accuracy)."""
    from hydra.core.hydra_config import HydraConfig

    from erasure.cli import console
    from erasure.runs import train

    settings = HydraConfig.get()
    folder = Path(settings.runtime.output_dir)
    threads = OmegaConf.select(settings, "launcher.cpus_per_task")
    if threads:  # a local process's share of the cores
        import torch

        torch.set_num_threads(int(threads))
    with console():
        if (folder / "metrics.json").is_file():
            log.info(f"{folder.name}: finished before, reused")
        else:
            try:  # an interrupted run's folder is started again
                train(load_config([*settings.overrides.task, f"output_dir={folder}", "overwrite=true"]))
            except Exception as error:  # noqa: BLE001 - one run's failure is reported in the table, not the end of the sweep
                log.error(f"{folder.name}: failed: {error}", exc_info=not isinstance(error, ConfigError))
                return math.nan, math.nan
    after = json.loads((folder / "metrics.json").read_text())["after"]
    return float(after.get(TARGET, math.nan)), float(after.get(RETAINED, math.nan))


def swept_keys(config: DictConfig) -> list[str]:
    """The keys the multirun's command line sweeps."""
    return [o.get_key_element().lstrip("+~") for o in parse(list(config.hydra.overrides.task)) if o.is_sweep_override()]


def pareto_front(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both objectives (target accuracy lower, retained accuracy higher),
    by target accuracy."""
    points = [r for r in rows if not r.get("failed")]

    def beats(a: dict, b: dict) -> bool:
        return a[TARGET] <= b[TARGET] and a[RETAINED] >= b[RETAINED] and (a[TARGET], a[RETAINED]) != (b[TARGET], b[RETAINED])

    return sorted((r for r in points if not any(beats(other, r) for other in points)), key=lambda r: r[TARGET])


def swept_values(row: dict, keys: list[str]) -> str:
    """A run's swept values, short: ``lr=0.00254, eta=1.49``."""
    return ", ".join(f"{key.split('.')[-1]}={row.get(key):.3g}" if isinstance(row.get(key), float)
                     else f"{key.split('.')[-1]}={row.get(key)}" for key in keys)


def pareto_chart(rows: list[dict], front: list[dict], keys: list[str], path: Path) -> None:
    """Every run's (target, retained) accuracy, the front joined and labelled with its swept values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    done = [r for r in rows if not r.get("failed")]
    axis.scatter([r[TARGET] for r in done], [r[RETAINED] for r in done], color="0.6", label="run")
    axis.plot([r[TARGET] for r in front], [r[RETAINED] for r in front], "o-", color="tab:red", label="Pareto front")
    labels: dict[tuple[float, float], list[str]] = {}
    for row in front:
        labels.setdefault((row[TARGET], row[RETAINED]), []).append(swept_values(row, keys))
    for (target, retained), texts in labels.items():
        axis.annotate("\n".join(texts), (target, retained), fontsize=6, xytext=(4, -4), textcoords="offset points",
                      va="top")
    axis.set(xlabel="target accuracy after erasure (lower is better)",
             ylabel="retained accuracy (higher is better)", title="multirun: erasure against retention")
    axis.legend(fontsize=7)
    figure.tight_layout()
    atomic_save(path, lambda temporary: figure.savefig(temporary, format="png"))
    plt.close(figure)


def rows_of(folder: Path, keys: list[str]) -> list[dict]:
    """One row per run folder under ``folder/runs``: swept values, reported metrics and fit seconds."""
    rows = []
    for run in sorted(p for p in (folder / "runs").iterdir() if p.is_dir()):
        row: dict[str, Any] = {"run": run.name}
        metrics_path, config_path = run / "metrics.json", run / "config.yaml"
        if config_path.is_file():
            saved = OmegaConf.load(config_path)
            row.update({key: OmegaConf.select(saved, key) for key in keys})
        if metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text())
            row.update({key: metrics["after"].get(key) for key in REPORTED})
            row["fit_s"] = metrics["seconds"]["fit"]
        else:
            row["failed"] = f"no metrics.json; see {run}"
        rows.append(row)
    return rows


def write_tables(folder: Path, keys: list[str]) -> list[dict]:
    """multirun.csv/.md and pareto.csv/.md/.png of the runs under ``folder``; returns the rows."""
    rows = rows_of(folder, keys)
    write_table(folder / "multirun.csv", rows)
    atomic_write_text(folder / "multirun.md", readable_table(rows, keys) + "\n")
    front = pareto_front(rows)
    if front:
        write_table(folder / "pareto.csv", front)
        atomic_write_text(folder / "pareto.md", readable_table(front, keys) + "\n")
        pareto_chart(rows, front, keys, folder / "pareto.png")
    return rows


def readable_table(rows: list[dict], keys: list[str]) -> str:
    """The rows as markdown, swept values to three significant digits (the CSV keeps them whole)."""
    return markdown_table([{**row, **{k: f"{row[k]:.3g}" for k in keys if isinstance(row.get(k), float)}}
                           for row in rows])


class RunTable(Callback):
    """Hydra callback: at the end of a multirun, the table of every run and the Pareto front."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        if not (folder / "runs").is_dir():
            return
        with console_if_needed():
            keys = swept_keys(config)
            rows = write_tables(folder, keys)
            log.info(readable_table(rows, keys))
            log.info(f"table: {folder / 'multirun.md'}; Pareto front: {folder / 'pareto.md'}")


def console_if_needed():
    """The erasure console unless a command already shows it."""
    from erasure.cli import console

    return contextlib.nullcontext() if logging.getLogger("erasure").handlers else console()

"""Multiruns (``erasure.train -m``): Hydra's sweepers and launchers, every run checked first, one table and
the Pareto front."""

import csv
import json
from datetime import datetime
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from erasure.multirun import RETAINED, TARGET, pareto_front
from erasure.sweep import main as sweep_main
from erasure.train import main

TINY = ["recipe=esd", "trainer.max_steps=1", "method.ddim_steps=2", "method.batch_size=1",
        "evaluation.images_per_prompt=1", "evaluation.steps=2"]


def started(result: Path) -> float:
    """When a submitit job started: the time of the first line of its log."""
    log = result.with_name(result.name.replace("result.pkl", "log.out")).read_text()
    stamp = log.split("(", 1)[1].split(")", 1)[0]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_the_pareto_front_keeps_the_runs_no_other_beats_on_both_objectives():
    rows = [{"run": "a", TARGET: 0.1, RETAINED: 0.7}, {"run": "b", TARGET: 0.2, RETAINED: 0.9},
            {"run": "c", TARGET: 0.3, RETAINED: 0.8}, {"run": "d", TARGET: 0.1, RETAINED: 0.6},
            {"run": "e", "failed": "no metrics.json"}]
    assert [row["run"] for row in pareto_front(rows)] == ["a", "b"]


@pytest.mark.parametrize("arguments, message", [
    (["recipe=esd", "method.lr=1e-3"], "nothing to sweep; give a key several values"),
    (["recipe=esd", "method.lr=1e-3,"], "cannot parse the overrides"),
    (["recipe=esd", "method.lr=1e-4,1e-3", "method.nope=1"], "unknown key 'method.nope'"),
    (["recipe=esd", "method.lr=1e-4,fast"], "invalid value for 'method.lr'"),
    (["recipe=esd", "method.lr=interval(1e-4,1e-3)"], "interval() is for hydra/sweeper=optuna"),
    (["recipe=esd", "method.lr=1e-4,1e-3", "hydra/launcher=mars"], "Could not find 'hydra/launcher/mars'"),
    (["recipe=esd", "method.lr=1e-4,1e-3", "hydra.sweeper.nope=2"], "hydra.sweeper.nope"),
    (["recipe=esd", "method.lr=1e-4,1e-3", "launcher.cluster=local"], "launcher.* belongs to erasure.compare"),
])
def test_bad_multiruns_are_one_line_and_write_nothing(tmp_path, capsys, arguments, message):
    output = tmp_path / "sweep"
    assert main(["-m", *arguments, f"output_dir={output}"]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not output.exists()


def test_a_three_run_sweep_through_submitit_two_at_a_time_writes_its_table(tmp_path):
    output = tmp_path / "sweep"
    assert sweep_main([*TINY, "method.lr=1e-5,1e-4,1e-3", "hydra/launcher=submitit_local",
                       "hydra.sweeper.max_batch_size=2", f"output_dir={output}"]) == 0
    rows = list(csv.DictReader(open(output / "multirun.csv")))
    assert sorted(float(row["method.lr"]) for row in rows) == [1e-5, 1e-4, 1e-3]
    for row in rows:
        run = output / "runs" / row["run"]
        assert row["run"] == f"method.lr={row['method.lr']}"  # named by the swept key alone
        metrics = json.loads((run / "metrics.json").read_text())
        assert float(row[TARGET]) == metrics["after"][TARGET]
        assert OmegaConf.load(run / "config.yaml").method.lr == float(row["method.lr"])
        assert OmegaConf.load(run / "config.yaml").sources["method.lr"] == "command line"
    jobs = sorted((output / ".submitit").glob("*/*_result.pkl"), key=started)
    assert len(jobs) == 3  # one submitit job per run; two at a time: the third starts once the first two ended
    assert started(jobs[2]) >= max(path.stat().st_mtime for path in jobs[:2]) - 1
    front = list(csv.DictReader(open(output / "pareto.csv")))
    assert front and {row["run"] for row in front} <= {row["run"] for row in rows}
    assert (output / "pareto.png").stat().st_size > 0


def test_an_optuna_search_writes_its_trials_and_pareto_front(tmp_path):
    output = tmp_path / "optuna"
    assert main(["-m", *TINY, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1",
                 "method.lr=tag(log,interval(1e-4,1e-2))", "method.eta=interval(0.5,2.0)",
                 f"output_dir={output}"]) == 0
    rows = list(csv.DictReader(open(output / "multirun.csv")))
    assert len(rows) == 2 and all(1e-4 <= float(row["method.lr"]) <= 1e-2 for row in rows)
    assert all(0.5 <= float(row["method.eta"]) <= 2.0 for row in rows)
    optuna_front = {tuple(s["values"]) for s in OmegaConf.load(output / "optimization_results.yaml").solutions}
    front = {(float(row[TARGET]), float(row[RETAINED])) for row in csv.DictReader(open(output / "pareto.csv"))}
    assert front == optuna_front  # Optuna's own front of (target down, retained up) is the table's


def test_cfg_job_prints_the_resolved_config_and_runs_nothing(tmp_path, capsys):
    output = tmp_path / "run"
    assert main(["recipe=esd", "method.lr=3e-4", f"output_dir={output}", "--cfg", "job"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.method.lr == 3e-4 and printed.sources["method.lr"] == "command line"
    assert not output.exists()
    assert main(["recipe=esd", "--cfg", "hydra"]) == 2
    assert "--cfg takes job" in capsys.readouterr().err

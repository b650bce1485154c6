"""Sweeps: axes from comma-separated values, every run checked first, runs through the launcher, one table."""

import csv
import json

import pytest
from omegaconf import OmegaConf

from erasure.launch import LaunchConfig, run_local
from erasure.sweep import main, run_name, split_axis

TINY = ["recipe=esd", "trainer.max_steps=1", "method.ddim_steps=2", "method.batch_size=1",
        "evaluation.images_per_prompt=1", "evaluation.steps=2"]


def test_commas_outside_brackets_and_quotes_make_an_axis():
    assert split_axis("1e-4,5e-4,1e-3") == ["1e-4", "5e-4", "1e-3"]
    assert split_axis("[circle,star]") == ["[circle,star]"]
    assert split_axis('"a, b",c') == ['"a, b"', "c"]
    assert split_axis("[a,b],[c]") == ["[a,b]", "[c]"]
    assert run_name({"method.lr": "1e-3", "concept": "[circle,star]"}) == "lr=1e-3-concept=_circle_star"


@pytest.mark.parametrize("arguments, message", [
    (["recipe=esd", "method.lr=1e-3"], "nothing to sweep; give a key several values"),
    (["recipe=esd", "method.lr=1e-3,"], "'method.lr' has an empty value in its sweep"),
    (["recipe=esd", "method.lr=1e-4,1e-3", "method.nope=1"], "unknown key 'method.nope'"),
    (["recipe=esd", "method.lr=1e-4,fast"], "invalid value for 'method.lr'"),
    (["recipe=esd", "method.lr=1e-4,1e-3", "launcher.cluster=mars"], "invalid value for 'launcher.cluster': 'mars'"),
    (["recipe=esd", "method.lr=1e-4,1e-3", "launcher.parallel=0"], "launcher.parallel and launcher.timeout_min must be"),
    (["recipe=esd", "method.lr=1e-4,1e-3", "launcher.nodes=2"], "unknown key 'launcher.nodes'"),
])
def test_bad_sweeps_are_one_line_and_write_nothing(tmp_path, capsys, arguments, message):
    output = tmp_path / "sweep"
    assert main([*arguments, f"output_dir={output}"]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not output.exists()


def test_a_three_run_sweep_through_the_local_launcher_writes_its_table(tmp_path):
    output = tmp_path / "sweep"
    assert main([*TINY, "method.lr=1e-5,1e-4,1e-3", "launcher.cluster=local", "launcher.parallel=2",
                 f"output_dir={output}"]) == 0
    rows = list(csv.DictReader(open(output / "sweep.csv")))
    assert [row["method.lr"] for row in rows] == ["1e-5", "1e-4", "1e-3"]
    for row in rows:
        metrics = json.loads((output / "runs" / row["run"] / "metrics.json").read_text())
        assert float(row["efficacy/target_acc"]) == metrics["after"]["efficacy/target_acc"]
        assert OmegaConf.load(output / "runs" / row["run"] / "config.yaml").method.lr == float(row["method.lr"])
    assert len(list((output / "launcher").glob("*_log.out"))) == 3  # one submitit job per run
    assert (output / "sweep.md").read_text().count("| lr=") == 3


class FakeJob:
    def __init__(self, executor, code):
        self.executor, self.code, self.polls = executor, code, 0

    def done(self):
        self.polls += 1
        if self.polls == 2:
            self.executor.running -= 1
        return self.polls >= 2

    def result(self):
        return self.code


class FakeExecutor:
    """Records how many jobs run at once and which GPUs each job was given."""

    def __init__(self):
        self.running = self.most = 0
        self.gpus, self.visible = [], None

    def update_parameters(self, visible_gpus):
        self.visible = visible_gpus

    def submit(self, function, arguments, threads):
        self.running += 1
        self.most = max(self.most, self.running)
        self.gpus.append(self.visible)
        return FakeJob(self, int(arguments[0]))


def test_local_launcher_keeps_parallel_jobs_in_flight_each_on_its_own_gpus():
    executor = FakeExecutor()
    codes = run_local(executor, [["0"], ["1"], ["0"], ["2"], ["0"]], LaunchConfig("local", parallel=2, gpus_per_job=2))
    assert codes == [0, 1, 0, 2, 0] and executor.most == 2
    assert executor.gpus[:2] == [[0, 1], [2, 3]] and all(g in ([0, 1], [2, 3]) for g in executor.gpus)

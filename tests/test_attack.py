"""The attack CLI: bad input, results next to the unattacked numbers, caching."""

import json

import pytest

from erasure.attack import main
from erasure.train import main as train


@pytest.fixture(scope="module")
def uce_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "uce"
    assert train(["recipe=uce", f"output_dir={output}", "evaluation.images_per_prompt=1", "evaluation.steps=4"]) == 0
    return output


def test_attack_writes_results_beside_the_run(uce_run, capsys):
    arguments = [f"run={uce_run}", "attacks=[inversion]", "attack.steps=2", "attack.images=4"]
    assert main(arguments) == 0
    result = json.loads((uce_run / "attacks" / "inversion.json").read_text())
    metrics = json.loads((uce_run / "metrics.json").read_text())
    assert result["target_acc_unattacked"] == metrics["after"]["efficacy/target_acc"]
    assert 0.0 <= result["attack_success_rate"] <= 1.0 and result["budget"]["steps"] == 2
    assert (uce_run / "attacks" / "inversion.png").is_file()
    assert "| inversion | uce |" in capsys.readouterr().out
    assert main(arguments) == 0  # cached: same budget, same result file
    assert json.loads((uce_run / "attacks" / "inversion.json").read_text()) == result


@pytest.mark.parametrize("arguments, message", [
    (["attacks=[inversion]"], "no run given; pass run=<run directory"),
    (["run=/nonexistent", "attacks=[inversion]"], "/nonexistent is not a run directory (no config.yaml)"),
    (["run=x", "attacks=[jailbreak]"], "unknown attack 'jailbreak' in attacks; choose from inversion, soft_prompt"),
    (["run=x", "attack.steps=-1"], "'attack.steps' must be an integer from 1"),
    (["run=x", "attack.stepz=3"], "unknown key 'attack.stepz'"),
])
def test_bad_input(capsys, arguments, message):
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1

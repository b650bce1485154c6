"""The attack CLI: bad input, results next to the unattacked numbers, caching."""

import hashlib
import json

import pytest

from erasure.attack import main
from erasure.compare import main as compare
from erasure.train import main as train


@pytest.fixture(scope="module")
def uce_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "uce"
    assert train(["recipe=uce", f"output_dir={output}", "evaluation.images_per_prompt=1", "evaluation.steps=4"]) == 0
    return output


def test_attack_writes_results_beside_the_run(uce_run, capsys):
    arguments = [f"run={uce_run}", "attacks=[inversion]", "attack.inversion.budget=toy", "attack.inversion.steps=2",
                 "attack.inversion.images=4"]
    assert main(arguments) == 0
    result = json.loads((uce_run / "attacks" / "inversion.json").read_text())
    metrics = json.loads((uce_run / "metrics.json").read_text())
    assert result["target_acc_unattacked"] == metrics["after"]["efficacy/target_acc"]
    assert 0.0 <= result["attack_success_rate"] <= 1.0 and result["budget"]["inversion.steps"] == 2
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
    (["run=x", "attack.embedding.positions=middle"],
     "unknown attack.embedding.positions 'middle'; choose from concept+end, all"),
    (["run=x", "attack.relearn.steps=[0,-5]"], "'attack.relearn.steps' must be step counts from 0, got -5"),
    (["run=x", "attack.relearn.lr=-1e-3"], "'attack.relearn.lr' must be a positive number"),
    (["run=x", "attack.ring_a_bell.population=2"], "'attack.ring_a_bell.population' must be at least 4, got 2"),
    (["run=x", "attack.ring_a_bell.mutation_rate=1.5"],
     "'attack.ring_a_bell.mutation_rate' must be a number in [0, 1]"),
    (["run=x", "attack.unlearndiffatk.tokens=0"],
     "'attack.unlearndiffatk.tokens' must be a whole number of at least 1"),
    (["run=x", "attack.ring_a_bell.strength=0"], "'attack.ring_a_bell.strength' must be a positive number, got 0"),
    (["run=x", "attack.inversion.budget=huge"], "unknown attack.inversion.budget 'huge'; choose from authors, toy"),
    (["run=x", "attack.inversion.accumulation=0"],
     "'attack.inversion.accumulation' must be a whole number of at least 1"),
])
def test_bad_input(capsys, arguments, message):
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def hashes(folder):
    """Every file of a run directory except its attacks/ results, by content."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and "attacks" not in f.relative_to(folder).parts}


def test_embedding_and_relearn_leave_the_run_alone(uce_run, capsys):
    before = hashes(uce_run)
    assert main([f"run={uce_run}", "attacks=[embedding,relearn]", "attack.steps=2", "attack.images=4",
                 "attack.batch_size=2", "attack.relearn.steps=[0,2]"]) == 0
    assert hashes(uce_run) == before
    metrics = json.loads((uce_run / "metrics.json").read_text())
    relearn = json.loads((uce_run / "attacks" / "relearn.json").read_text())
    embedding = json.loads((uce_run / "attacks" / "embedding.json").read_text())
    for result in (relearn, embedding):
        low, high = result["attack_success_rate_ci95"]
        assert 0 <= low <= result["attack_success_rate"] <= high <= 1
    # each result records the options its attack reads, and only those (so one attack's cache survives another's change)
    assert relearn["budget"]["relearn.steps"] == [0, 2] and "relearn.steps" not in embedding["budget"]
    assert embedding["budget"]["embedding.positions"] == "concept+end"
    assert "unlearndiffatk.lr" not in embedding["budget"]
    # step 0 is the erased model: its rate is the run's target accuracy (same prompts, seeds, sampler)
    assert relearn["attack_success_rate_by_step"][0] == metrics["after"]["efficacy/target_acc"]
    retained = {row.split(",")[-1] for row in (uce_run / "prompts" / "retained.csv").read_text().splitlines()[1:]}
    assert relearn["control"]["concept"] in retained and len(relearn["control"]["success_rate_by_step"]) == 2
    assert embedding["free_positions"].startswith("concept+end") and (uce_run / "attacks" / "relearn.png").is_file()
    out = capsys.readouterr().out
    assert "| embedding | uce |" in out and "relearn on uce, success rate after" in out


def test_the_fields_attacks_run_on_a_run_directory(uce_run, capsys):
    """UnlearnDiffAtk and Ring-A-Bell through the CLI: results with their own fields, the run untouched."""
    before = hashes(uce_run)
    assert main([f"run={uce_run}", "attacks=[unlearndiffatk,ring_a_bell]", "attack.unlearndiffatk.timesteps=2",
                 "attack.unlearndiffatk.iterations=2", "attack.ring_a_bell.population=8",
                 "attack.ring_a_bell.generations=2"]) == 0
    assert hashes(uce_run) == before
    metrics = json.loads((uce_run / "metrics.json").read_text())
    unlearndiffatk = json.loads((uce_run / "attacks" / "unlearndiffatk.json").read_text())
    ring_a_bell = json.loads((uce_run / "attacks" / "ring_a_bell.json").read_text())
    # before its search, UnlearnDiffAtk looks at the erased model's own images: the run's target accuracy
    assert unlearndiffatk["pre_attack_success_rate"] == metrics["after"]["efficacy/target_acc"]
    assert unlearndiffatk["pre_attack_success_rate"] <= unlearndiffatk["attack_success_rate"]
    assert unlearndiffatk["pre_attack_success_rate"] <= unlearndiffatk["random_control_success_rate"]
    assert unlearndiffatk["random_control_judged_images"] <= 2 * unlearndiffatk["attacked_images"]
    assert unlearndiffatk["budget"]["unlearndiffatk.timesteps"] == 2 and unlearndiffatk["prefix_tokens"] == 3
    assert len(ring_a_bell["found_prompts"]) == len((uce_run / "prompts" / "target.csv").read_text().splitlines()) - 1
    assert ring_a_bell["budget"]["ring_a_bell.generations"] == 2
    assert "| unlearndiffatk | uce |" in capsys.readouterr().out


def test_compare_refuses_a_bad_attack_option_in_one_line(tmp_path, capsys):
    assert compare(["recipes=[esd]", "attacks=[embedding]", "attack.embedding.positions=middle",
                    f"output_dir={tmp_path / 'comparison'}"]) == 2
    error = capsys.readouterr().err.strip()
    assert "unknown attack.embedding.positions 'middle'" in error and len(error.splitlines()) == 1

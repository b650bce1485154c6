"""The comparison: runs and reused runs on one protocol, its table, figures and analyses."""

import csv
import json

import pytest

from erasure.toyworld.real_architectures import build_random_flux_pipeline
from erasure.compare import main
from erasure.train import main as train

SMALL = ["evaluation.images_per_prompt=1", "evaluation.steps=4"]


@pytest.fixture(scope="module")
def uce_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "uce-circle"
    assert train(["recipe=uce", f"output_dir={output}", *SMALL]) == 0
    return output


def test_compare_runs_new_recipes_and_reuses_finished_runs(tmp_path, uce_run, capsys):
    output = tmp_path / "comparison"
    assert main([f"recipes=[instruction,{uce_run}]", "templates=[explicit]", f"output_dir={output}", *SMALL]) == 0
    log = capsys.readouterr().out
    assert "[1/2] instruction-explicit: running" in log and f"[2/2] uce-circle: reusing {uce_run}" in log
    for artifact in ("comparison.csv", "comparison.md", "metrics.png", "grid.png", "attention_circle.png", "report.md",
                     "analysis/text_similarity.csv", "analysis/attention_curves.csv", "analysis/attention_auc.csv",
                     "runs/instruction-explicit/metrics.json"):
        assert (output / artifact).is_file(), artifact
    rows = {row["method"]: row for row in csv.DictReader(open(output / "comparison.csv"))}
    assert list(rows) == ["original model", "instruction-explicit", "uce-circle"]
    for label, path in (("uce-circle", uce_run), ("instruction-explicit", output / "runs" / "instruction-explicit")):
        after = json.loads((path / "metrics.json").read_text())["after"]
        assert {k: json.loads(rows[label][k]) for k in after} == after
    auc = {row["curve"]: row for row in csv.DictReader(open(output / "analysis" / "attention_auc.csv"))}
    assert {"plain prompt", "base + explicit", "base + implicit", "base + repetition", "base + negative_prompt",
            "uce-circle (erased)"} <= set(auc)
    assert float(auc["plain prompt"]["delta_auc"]) == 0.0
    templates = {row["template"] for row in csv.DictReader(open(output / "analysis" / "text_similarity.csv"))}
    assert templates == {"repetition", "explicit", "implicit"}
    report = (output / "report.md").read_text()
    assert "| uce-circle |" in report and "![attention circle](attention_circle.png)" in report
    assert "evaluator: toyworld-classifier" in report

    # a second call reuses everything in the comparison directory
    assert main([f"recipes=[instruction,{uce_run}]", "templates=[explicit]", f"output_dir={output}", *SMALL]) == 0
    assert "[1/2] instruction-explicit: reusing" in capsys.readouterr().out


def test_a_flux_comparison_says_why_it_has_no_cross_attention_analysis(tmp_path):
    """FLUX reads text in joint attention: the report says the attention section is not measured, and its
    protocol names FLUX's sampler, not an empty table under a DDIM heading."""
    pipeline = build_random_flux_pipeline(small=True)
    pipeline.tokenizer_2.model_max_length = 16  # the real 512 T5 tokens only slow the test down
    pipeline.save_pretrained(tmp_path / "flux", safe_serialization=True)
    output = tmp_path / "comparison"
    assert main(["recipes=[instruction]", "templates=[explicit]", f"model={tmp_path / 'flux'}", "model.resolution=64",
                 f"output_dir={output}", *SMALL]) == 0
    report = (output / "report.md").read_text()
    assert "Not measured: this model has no cross-attention" in report and "| concept | curve |" not in report
    assert "sampler: Euler (FluxPipeline's flow-matching schedule, shifted by the token count)" in report
    assert "| instruction-explicit |" in report and (output / "grid.png").is_file()


def test_runs_with_different_protocols_are_refused(tmp_path, uce_run, capsys):
    assert main([f"recipes=[instruction,{uce_run}]", "templates=[explicit]", f"output_dir={tmp_path / 'c'}",
                 "evaluation.images_per_prompt=2", "evaluation.steps=4"]) == 2
    assert "was evaluated with images_per_prompt=" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["concept=circle"], "no recipes given; pass recipes=["),
    (["recipes=[esd,nope]"], "'nope' in recipes is neither a recipe"),
    (["recipes=[instruction]", "templates=[shouting]"], "unknown template 'shouting' in templates"),
    (["recipes=[esd]", "trainer.max_step=3"], "unknown key 'trainer.max_step'"),
    (["recipes=[esd]", "launcher.cluster=mars"], "invalid value for 'launcher.cluster': 'mars'; choose one of: inline"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, arguments, message):
    output = tmp_path / "comparison"
    assert main([*arguments, f"output_dir={output}"]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not output.exists()


def test_prompts_that_do_not_spell_the_concept_skip_the_analyses(tmp_path, capsys):
    """(Its run is trained through the local launcher: a process of its own, as erasure.launch starts it.)"""
    prompts = tmp_path / "target.csv"
    prompts.write_text("case_number,prompt,evaluation_seed,concept\n0,a red disk,0,circle\n1,a blue disk,1,circle\n")
    output = tmp_path / "comparison"
    assert main(["recipes=[instruction]", "templates=[explicit]", f"output_dir={output}",
                 f"evaluation.target_csv={prompts}", "launcher.cluster=local", *SMALL]) == 0
    assert list((output / "launcher").glob("*_log.out"))  # submitit's log of the job
    assert "no target prompt spells 'circle': no text or attention analysis for it" in capsys.readouterr().out
    assert (output / "report.md").is_file() and (output / "grid.png").is_file()
    assert "- no target prompt spells 'circle'" in (output / "report.md").read_text()  # the report says why, too
    assert not (output / "attention_circle.png").exists()

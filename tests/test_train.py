"""The training CLI: errors, determinism, resume, and the delta that reproduces the erased model."""

import csv
import json

import pytest
import torch

from erasure.methods.base import EraserModule
from erasure.train import main
from erasure.weights import load_delta

FAST = ["trainer.checkpoint_every_n_steps=2", "method.ddim_steps=6", "method.batch_size=1", "evaluation.enabled=false"]


@pytest.mark.parametrize("arguments, message", [
    (["recipe=nope"], "unknown recipe 'nope'; available recipes: ablation, advunlearn, esd, esd-fast, instruction, lora, lora-fast, mace, rece, safree, sld, speed, time, uce"),
    (["recipe=esd", "trainer.max_step=3"], "unknown key 'trainer.max_step'; valid keys here: accelerator"),
    (["recipe=esd", "method.train_method=esd-q"], "'method.train_method': 'esd-q'; choose one of: esd-x, esd-x-strict"),
    (["recipe=esd", "trainer.max_steps=many"], "invalid value for 'trainer.max_steps'"),
    (["recipe=esd", "method.eta=strong"], "invalid value for 'method.eta'"),
    (["recipe=esd", "concept=[]"], "concept must be a non-empty word"),
    (["recipe=esd", "trainer.max_steps=-5"], "'trainer.max_steps' must be an integer from 1 to 2147483647, got -5"),
    (["esd"], "argument 'esd' is not of the form key=value"),
    (["trainer.max_steps=3"], "no recipe given; pass recipe=<name>"),
    (["recipe=esd", "model.path=/nonexistent/sd"], "'model.path': no folder at /nonexistent/sd"),
    (["recipe=esd", "evaluation.evaluator=none", f"concept={'circle ' * 40}"], "is 40 tokens but the text encoder reads 30; use a shorter concept"),
    (["recipe=esd", "evaluation.toyworld.classifier=/nonexistent"], "'evaluation.toyworld.classifier': no folder at /nonexistent"),
    (["recipe=esd", "resume=true"], "has no checkpoints/last.ckpt; pass the run directory to continue"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, arguments, message):
    output = tmp_path / "run"
    assert main([*arguments, f"output_dir={output}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]  # (model loading may print its progress bar first)
    assert not output.exists()


def test_help_lists_recipes_and_keys(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "recipes: ablation, advunlearn, esd, esd-fast, instruction, lora, lora-fast, mace, rece, safree, sld, speed, time, uce" in text and "method.train_method=esd-u" in text and "model.path" in text


def test_existing_output_dir_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    assert main(["recipe=esd", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "already exists; pass overwrite=true" in capsys.readouterr().err
    assert (tmp_path / "run" / "keep.txt").exists()


def test_resume_finishes_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(["recipe=esd", "trainer.max_steps=4", f"output_dir={straight}", *FAST]) == 0
    assert main(["recipe=esd", "trainer.max_steps=2", f"output_dir={interrupted}", *FAST]) == 0
    assert main(["recipe=esd", "trainer.max_steps=4", f"output_dir={interrupted}", "resume=true", *FAST]) == 0
    a, b = load_delta(straight / "erased" / "unet_delta.safetensors"), load_delta(interrupted / "erased" / "unet_delta.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    assert torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_the_step_in_backward_gives_lightnings_update_and_holds_no_gradients_together(tmp_path, monkeypatch):
    gradients_at_step = []  # trained tensors holding a gradient when Lightning's optimizer step comes
    monkeypatch.setattr(EraserModule, "on_before_optimizer_step", lambda module, optimizer: gradients_at_step.append(
        sum(p.grad is not None for p in module.trained.values())))
    outputs = {}
    for fused in (True, False):
        outputs[fused] = tmp_path / str(fused)
        assert main(["recipe=esd", "method.train_method=esd-u", "method.lr=1e-3", "trainer.max_steps=3",
                     f"trainer.step_in_backward={str(fused).lower()}", f"output_dir={outputs[fused]}", *FAST]) == 0
    assert gradients_at_step[:3] == [0, 0, 0] and len(gradients_at_step) == 6 and min(gradients_at_step[3:]) > 0
    fused, lightning = (load_delta(outputs[f] / "erased" / "unet_delta.safetensors") for f in (True, False))
    assert fused.keys() == lightning.keys() and all(torch.equal(fused[k], lightning[k]) for k in fused)
    states = [torch.load(outputs[f] / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"]
              for f in (True, False)]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][i]["exp_avg_sq"], states[1][i]["exp_avg_sq"]) for i in states[1])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A short ESD run with a small evaluation, shared by the tests below."""
    output = tmp_path_factory.mktemp("runs") / "esd"
    arguments = ["recipe=esd", "trainer.max_steps=3", f"output_dir={output}", "trainer.checkpoint_every_n_steps=2",
                 "method.ddim_steps=6", "method.lr=1e-3", "evaluation.images_per_prompt=1", "evaluation.steps=8"]
    assert main(arguments) == 0
    return output, arguments


def test_run_directory_has_every_artifact(small_run):
    output, _ = small_run
    for path in ("config.yaml", "erased/unet_delta.safetensors", "metrics.json", "report.md", "samples/target.png",
                 "samples/retained.png", "prompts/target.csv", "logs/metrics.csv", "checkpoints/last.ckpt"):
        assert (output / path).is_file(), path
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["recipe"] == "esd" and metrics["erase"] == ["circle"]
    accuracies = ("efficacy/target_acc", "generality/synonym_acc", "specificity/retained_acc")
    retained = [row["concept"] for row in csv.DictReader((output / "prompts" / "retained.csv").open())]
    per_concept = [f"specificity/retained_acc/{c}" for c in dict.fromkeys(retained)]
    assert len(per_concept) > 1
    for phase in ("before", "after"):
        named = [*accuracies, *per_concept]
        assert set(metrics[phase]) == {*named, *(f"{a}_ci95" for a in named), "fidelity/kid", "alignment/clip_score"}
        overall = sum(metrics[phase][p] * retained.count(p.split("/")[-1]) for p in per_concept) / len(retained)
        assert overall == pytest.approx(metrics[phase]["specificity/retained_acc"], abs=1e-3)  # its parts
        for name in accuracies:  # every accuracy with its 95% interval around it
            low, high = metrics[phase][f"{name}_ci95"]
            assert 0 <= low <= metrics[phase][name] <= high <= 1 and high - low > 0.05
    assert metrics["seconds"]["fit"] > 0 and metrics["seconds"]["eval"] > 0
    assert metrics["protocol"]["name"] == "toyworld"
    assert "| efficacy/target_acc |" in (output / "report.md").read_text()
    config = (output / "config.yaml").read_text()
    assert "method.batch_size: model preset toyworld" in config and "method.prompt_template: protocol toyworld" in config
    assert "method.lr: command line" in config and "method.loss: recipe esd" in config


def test_same_seed_same_metrics(small_run, tmp_path):
    output, arguments = small_run
    again = tmp_path / "again"
    assert main([a for a in arguments if not a.startswith("output_dir")] + [f"output_dir={again}"]) == 0
    first, second = (json.loads((p / "metrics.json").read_text()) for p in (output, again))
    assert first["before"] == second["before"] and first["after"] == second["after"]


def test_unwritable_output_dir_is_one_line_exit_2(capsys):
    assert main(["recipe=uce", "output_dir=/proc/erasure-run"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: cannot create output_dir /proc/erasure-run") and "choose a writable" in error


def test_a_concept_the_tokenizer_cannot_encode_is_refused():
    """Byte-level BPE (CLIP) encodes every string; other tokenizers map unknown text to unk."""
    from erasure.config import ConfigError
    from erasure.runs import check_concepts

    class WordTokenizer:
        model_max_length, unk_token, unk_token_id = 77, "<unk>", 0

        def __call__(self, text, add_special_tokens=False):
            return type("Encoding", (), {"input_ids": [0 if word == "Ŋ" else 5 for word in text.split()]})()

    check_concepts(WordTokenizer(), ["van gogh"])
    with pytest.raises(ConfigError, match="cannot encode concept 'van Ŋ' .unknown tokens."):
        check_concepts(WordTokenizer(), ["van Ŋ"])


def test_periodic_evaluations_are_kept_with_their_training_time(tmp_path):
    """``evaluation.every_n_steps``: each evaluation during the fit is in metrics.json's history with the
    training seconds before it; the last entry is the final evaluation."""
    output = tmp_path / "run"
    assert main(["recipe=esd", "trainer.max_steps=4", f"output_dir={output}", "evaluation.every_n_steps=2",
                 "evaluation.images_per_prompt=1", *FAST[:-1]]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    history = metrics["history"]
    assert [entry["step"] for entry in history] == [2, 4]
    assert 0 < history[0]["train_seconds"] < history[1]["train_seconds"] == pytest.approx(metrics["seconds"]["fit"], abs=0.06)
    assert {k: v for k, v in history[1].items() if k not in ("step", "train_seconds")} == metrics["after"]
    assert 0 <= history[0]["efficacy/target_acc"] <= 1


def test_tensorboard_logger_holds_the_loss_curve_and_the_sample_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "run"
    assert main(["recipe=esd", "trainer.max_steps=3", f"output_dir={output}", "trainer.logger=tensorboard",
                 "trainer.log_every_n_steps=1", "evaluation.images_per_prompt=1", *FAST[:-1]]) == 0
    events = EventAccumulator(str(output / "logs"), size_guidance={"images": 0}).Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [0, 1, 2]
    assert events.Scalars("after/efficacy/target_acc")[0].value == json.loads((output / "metrics.json").read_text())["after"]["efficacy/target_acc"]
    assert {"samples/target", "samples/synonym", "samples/retained"} <= set(events.Tags()["images"])
    assert events.Images("samples/target")[0].width > 0


@pytest.mark.parametrize("logger, message", [
    ("neptune", "invalid value for 'trainer.logger': 'neptune'; choose one of: csv, tensorboard, wandb, mlflow"),
    ("wandb", "trainer.logger=wandb needs the wandb package; pip install 'erasure[wandb]' or use trainer.logger=csv"),
])
def test_unknown_or_missing_logger_is_one_line(tmp_path, capsys, monkeypatch, logger, message):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    assert main(["recipe=esd", f"trainer.logger={logger}", f"output_dir={tmp_path / 'run'}"]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_the_main_job_ends_with_its_metrics_table_and_shows_no_library_warning(tmp_path):
    """README's main job, shortened: the console's last lines are the before/after table with intervals and
    the report's path; stderr holds no library warning, deprecation or tip (only progress bars)."""
    import subprocess
    import sys

    output = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "erasure.train", "recipe=esd", "trainer.max_steps=2",
                           "trainer.log_every_n_steps=1", "evaluation.images_per_prompt=1", f"output_dir={output}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1] == f"report: {output / 'report.md'}"
    table = lines[-7:-1]
    assert table[0].split() == ["before", "after"] and table[1].startswith("efficacy/target_acc")
    assert all("[" in row for row in table[1:4])  # accuracies with their 95% intervals
    assert table[4].startswith("fidelity/kid") and table[5].startswith("alignment/clip_score")  # the toy CLIP's
    noise = [line for line in done.stderr.replace("\r", "\n").splitlines()
             if line.strip() and "it/s" not in line and "s/it" not in line]
    assert not noise, noise

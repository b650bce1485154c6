"""The real-model mass protocol: concepts drawn from an artists-format CSV, CLIP among all of them, MACE's H."""

import csv
import json

import pytest

from erasure.config import ConfigError, load_config
from erasure.train import main
from evaluation.metrics import harmonic_mean

COLOURS = ["red", "orange", "yellow", "green", "blue", "purple"]


@pytest.fixture
def colours_csv(tmp_path):
    """The toy world's colours as the listed concepts, four prompts each."""
    path = tmp_path / "colours.csv"
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["case_number", "prompt", "evaluation_seed", "artist"])
        for k, (colour, shape) in enumerate((c, s) for c in COLOURS for s in ("circle", "square", "star", "heart")):
            writer.writerow([k, f"a {colour} {shape}", k, colour])
    return path


def config(colours_csv, *overrides):
    return load_config(["recipe=uce", "protocol=mass-csv", f"evaluation.prompts_csv={colours_csv}", *overrides])


def test_the_concepts_are_drawn_from_the_file_and_nest(colours_csv):
    two, four = (list(config(colours_csv, f"evaluation.concepts={n}").concept) for n in (2, 4))
    assert len(set(four)) == 4 and set(four) <= set(COLOURS) and four[:2] == two
    assert list(config(colours_csv, "concept=[red]").concept) == ["red"]
    with pytest.raises(ConfigError, match="evaluation.concepts must be from 1 to 6, got 7"):
        config(colours_csv, "evaluation.concepts=7")


def test_a_run_scores_the_erased_and_the_kept_concepts_and_macess_h(colours_csv, tmp_path):
    output = tmp_path / "run"
    assert main(["recipe=uce", "protocol=mass-csv", f"evaluation.prompts_csv={colours_csv}", "evaluation.concepts=2",
                 "evaluation.clip.checkpoint=checkpoints/toyworld/clip", "evaluation.clip.template=a {concept} shape",
                 "evaluation.steps=10", f"output_dir={output}"]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert before["efficacy/target_acc"] >= 0.75 and after["efficacy/target_acc"] < before["efficacy/target_acc"]
    assert after["specificity/distant_acc"] >= 0.75  # the four other colours, 16 prompts
    expected = harmonic_mean([1 - after["efficacy/target_acc"], after["specificity/distant_acc"]])
    assert after["summary/harmonic_mean"] == pytest.approx(expected, abs=1e-4)

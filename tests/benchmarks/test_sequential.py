"""Sequential erasure: each request starts from the model the last one left, and a finished step is kept."""

import json

from safetensors.torch import load_file

from benchmarks.sequential import run_sequence
from erasure.bundle import TOYWORLD_CLASSIFIER, TOYWORLD_MODEL
from evaluation.protocols.mass import drawn_compounds
from evaluation.protocols.toyworld import ToyWorldEvaluator, ToyWorldEvaluatorConfig

UNET = "unet/diffusion_pytorch_model.safetensors"


def test_each_request_edits_the_previous_model_and_a_rerun_resumes(tmp_path):
    judge = ToyWorldEvaluator(ToyWorldEvaluatorConfig(str(TOYWORLD_CLASSIFIER)))
    requests = drawn_compounds(2)
    steps = run_sequence("uce", requests, tmp_path, judge, [])
    assert [s["concept"] for s in steps] == requests
    base, first, second = (load_file(folder / UNET) for folder in
                           (TOYWORLD_MODEL, tmp_path / "uce" / "model-01", tmp_path / "uce" / "model-02"))
    changed = [k for k in base if not base[k].equal(first[k])]
    assert changed and all(".attn2.to_" in k for k in changed)  # UCE's edit, on the base model
    assert any(not first[k].equal(second[k]) for k in changed)  # the second edit starts from the first
    assert 0 <= steps[1]["first_request_acc"] <= 1 and "neighbour_acc" in steps[1]
    written = (tmp_path / "uce" / "steps.json").read_text()
    assert run_sequence("uce", requests, tmp_path, judge, []) == json.loads(written)  # nothing run again

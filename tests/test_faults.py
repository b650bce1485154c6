"""Faults during a run: a non-finite loss, Ctrl-C, SIGTERM; each leaves weights or a checkpoint to go on from."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from erasure.methods.esd import ESD
from erasure.train import main
from erasure.weights import load_delta

FAST = ["recipe=esd", "trainer.checkpoint_every_n_steps=2", "method.ddim_steps=6", "method.batch_size=1",
        "evaluation.enabled=false"]


def delta(run):
    return load_delta(run / "erased" / "unet_delta.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    output = tmp_path_factory.mktemp("runs") / "two"
    assert main([*FAST, "trainer.max_steps=2", f"output_dir={output}"]) == 0
    return output


def fail_from_step(monkeypatch, step, failure):
    objective = ESD.objective

    def failing(self):
        return failure() if self.global_step >= step else objective(self)

    monkeypatch.setattr(ESD, "objective", failing)


def test_a_non_finite_loss_stops_with_the_last_good_weights(tmp_path, capsys, monkeypatch, two_steps):
    fail_from_step(monkeypatch, 2, lambda: torch.tensor(float("nan"), requires_grad=True))
    output = tmp_path / "nan"
    assert main([*FAST, "trainer.max_steps=5", f"output_dir={output}"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: the loss was not finite at step 2: training stopped") and "lower method.lr" in error
    assert same(delta(output), delta(two_steps))  # the weights after steps 0 and 1


def test_ctrl_c_leaves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path, capsys, monkeypatch):
    def interrupt():
        raise KeyboardInterrupt

    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main([*FAST, "trainer.max_steps=4", f"output_dir={straight}"]) == 0
    with monkeypatch.context() as patch:
        fail_from_step(patch, 3, interrupt)
        with pytest.raises(SystemExit):
            main([*FAST, "trainer.max_steps=4", f"output_dir={interrupted}"])
    assert "interrupted at step 3; checkpoint saved: continue with resume=true" in capsys.readouterr().err
    assert torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert not (interrupted / "erased").exists()
    assert main([*FAST, "trainer.max_steps=4", f"output_dir={interrupted}", "resume=true"]) == 0
    assert same(delta(straight), delta(interrupted))


def test_sigterm_stops_after_a_step_and_resume_finishes_the_same(tmp_path):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    command = [sys.executable, "-m", "erasure.train", *FAST, "trainer.max_steps=1000", f"output_dir={interrupted}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = interrupted / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 143, err
    assert "stopped: terminated at step" in err and "resume=true" in err
    step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 2 <= step < 1000
    assert main([*FAST, f"trainer.max_steps={step + 1}", f"output_dir={interrupted}", "resume=true"]) == 0
    assert main([*FAST, f"trainer.max_steps={step + 1}", f"output_dir={straight}"]) == 0
    assert same(delta(straight), delta(interrupted))


def test_bf16_mixed_precision_trains(tmp_path):
    output = tmp_path / "bf16"
    assert main([*FAST, "trainer.max_steps=2", "trainer.precision=bf16-mixed", f"output_dir={output}"]) == 0
    changed = delta(output)
    assert changed and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in changed.values())


def test_two_process_ddp_matches_one_process_evaluation(tmp_path):
    common = ["recipe=esd", "trainer.max_steps=2", "method.ddim_steps=4", "method.batch_size=1",
              "evaluation.images_per_prompt=1", "evaluation.steps=4", "evaluation.batch_size=4",
              "trainer.accelerator=cpu"]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "erasure.train", *common, "trainer.devices=2",
                             "trainer.strategy=ddp", f"output_dir={tmp_path / 'ddp'}"],
                            capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    assert main([*common, f"output_dir={tmp_path / 'one'}"]) == 0
    ddp, one = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("ddp", "one"))
    # the same model, generation split over two ranks: the same accuracies; KID to rounding (Lightning gives
    # each CPU rank one thread, so the classifier's features are summed in another order)
    kid = "fidelity/kid"
    assert {k: v for k, v in ddp["before"].items() if k != kid} == {k: v for k, v in one["before"].items() if k != kid}
    assert ddp["before"][kid] == pytest.approx(one["before"][kid], abs=1e-3)
    assert set(ddp["after"]) == set(one["after"]) and delta(tmp_path / "ddp")

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from safetensors.torch import load_file

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.generation import Sampler, generate
from erasure.toyworld import pretrain
from erasure.toyworld.classifier import load_classifier


def test_quick_pretraining_produces_a_loadable_pipeline_and_classifier(tmp_path):
    pretrain.main(["--quick", "--output", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    pipeline = load_pipeline(tmp_path / "out" / "sd")
    images = generate(pipeline, ["a red circle", "a disk"], [0, 1], Sampler(steps=2))
    assert images.shape == (2, 32, 32, 3)
    load_classifier(tmp_path / "out" / "classifier")
    record = json.loads((tmp_path / "out" / "pretrain.json").read_text())
    assert record["budget"]["unet_steps"] == pretrain.QUICK.unet_steps
    assert 0.0 < pipeline.vae.config.scaling_factor < 100.0


def test_continued_pretraining_keeps_vae_and_classifier_and_starts_from_the_unet(tmp_path):
    init = TOYWORLD_MODEL.parent
    pretrain.main(["--quick", "--init", str(init), "--lr", "1e-4", "--output", str(tmp_path / "out"),
                   "--work", str(tmp_path / "work")])
    out = tmp_path / "out"
    for part in ("sd/vae/diffusion_pytorch_model.safetensors", "classifier/model.safetensors"):
        before, after = load_file(init / part), load_file(out / part)
        assert all(torch.equal(before[k], after[k]) for k in before), part
    before = load_file(init / "sd/unet/diffusion_pytorch_model.safetensors")
    after = load_file(out / "sd/unet/diffusion_pytorch_model.safetensors")
    change = sum((after[k] - before[k]).norm() ** 2 for k in before) ** 0.5 / sum(v.norm() ** 2 for v in before.values()) ** 0.5
    assert 0 < change < 0.05  # a few small steps away from the initial UNet, not a fresh one
    assert json.loads((out / "pretrain.json").read_text())["init"] == str(init)


def test_init_without_a_model_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--quick", "--init", str(tmp_path), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "no sd/unet folder there" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


class CountingModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.calls = 0

    def training_step(self, batch, batch_idx):
        self.calls += 1
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_resumes_from_the_last_checkpoint(tmp_path):
    loader = DataLoader(torch.randn(64, 2), batch_size=4)
    first = CountingModule()
    pretrain.fit(first, loader, steps=6, stage_dir=tmp_path, every=3)
    assert (tmp_path / "last.ckpt").exists() and first.calls == 6
    resumed = CountingModule()
    pretrain.fit(resumed, loader, steps=12, stage_dir=tmp_path, every=3)
    assert resumed.calls == 6  # continued at step 6, did not start over
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 12


def test_quick_flux_pretraining_produces_a_flux_pipeline_and_a_larger_budget_continues_it(tmp_path):
    arguments = ["family=flux", "--quick", "--output", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    pretrain.main(arguments)
    pipeline = load_pipeline(tmp_path / "out" / "flux")
    assert type(pipeline).__name__ == "FluxPipeline" and pipeline.vae.config.shift_factor is not None
    images = generate(pipeline, ["a red circle", "a disk"], [0, 1], Sampler(steps=2))
    assert images.shape == (2, 32, 32, 3)
    first = load_file(tmp_path / "out" / "flux" / "transformer" / "diffusion_pytorch_model.safetensors")
    first_record = json.loads((tmp_path / "out" / "pretrain_flux.json").read_text())
    pretrain.main([*arguments, "--flow-steps", str(2 * pretrain.QUICK.flow_steps)])
    record = json.loads((tmp_path / "out" / "pretrain_flux.json").read_text())
    assert record["family"] == "flux" and record["budget"]["flow_steps"] == 2 * pretrain.QUICK.flow_steps
    assert record["continues"] == first_record  # the continued run's record keeps the first and adds the time
    assert record["seconds_total"] == pytest.approx(first_record["seconds"] + record["seconds"], abs=0.11)
    second = load_file(tmp_path / "out" / "flux" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(first[k], second[k]) for k in first)  # trained on from the first run's end

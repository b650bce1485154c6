import json

import lightning as L
import torch
from torch.utils.data import DataLoader

from erasure.bundle import load_pipeline
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

import pytest
import torch

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.generation import Sampler, generate
from erasure.methods.esd import ESD, ESDConfig
from erasure.weights import DeltaError, apply_delta, export_pipeline, load_delta

PROMPTS, SEEDS, FAST = ["a circle", "a red circle", "a blue star"], [0, 1, 2], Sampler(steps=8)


def test_delta_on_a_fresh_pipeline_reproduces_the_erased_model_exactly(tmp_path):
    module = ESD(load_pipeline(TOYWORLD_MODEL), ESDConfig(train_method="esd-x"), ["circle"])
    edited = [n for n in module.trained if ".to_v." in n]
    with torch.no_grad():  # stand-in for training: change some of the trainable tensors
        for name in edited:
            module.trained[name].add_(0.05 * torch.randn_like(module.trained[name]))
    erased_images = module.generate(PROMPTS, SEEDS, FAST)
    delta_path = module.save_erased(tmp_path / "erased")
    assert sorted(load_delta(delta_path)) == sorted(edited)  # only the changed tensors are stored

    fresh = load_pipeline(TOYWORLD_MODEL)
    base_images = generate(fresh, PROMPTS, SEEDS, FAST)
    apply_delta(fresh.unet, delta_path)
    assert torch.equal(generate(fresh, PROMPTS, SEEDS, FAST), erased_images)
    assert not torch.equal(base_images, erased_images)
    assert torch.equal(module.generate(PROMPTS, SEEDS, FAST, original=True), base_images)

    exported = export_pipeline(TOYWORLD_MODEL, delta_path, tmp_path / "exported")
    assert torch.equal(generate(load_pipeline(exported), PROMPTS, SEEDS, FAST), erased_images)


def test_a_delta_for_another_model_is_refused(tmp_path):
    unet = load_pipeline(TOYWORLD_MODEL).unet
    name = next(n for n, _ in unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    with pytest.raises(DeltaError, match="has shape"):
        apply_delta(unet, {name: torch.zeros(3, 3)})
    with pytest.raises(DeltaError, match="does not have"):
        apply_delta(unet, {"no.such.weight": torch.zeros(1)})
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"garbage")
    with pytest.raises(DeltaError, match="cannot read the weight delta"):
        load_delta(broken)

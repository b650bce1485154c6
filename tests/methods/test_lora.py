import contextlib

import pytest
import torch

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.generation import Sampler, generate
from erasure.methods.ablation import start_token_detached
from erasure.methods.lora import LoRA, LoRAConfig

PROMPTS, SEEDS, FAST = ["a circle", "a star", "a red square"], [0, 1, 2], Sampler(steps=8)


def trained_eraser(concept: str, seed: int) -> LoRA:
    module = LoRA(load_pipeline(TOYWORLD_MODEL), LoRAConfig(prompt_template="a {concept}"), [concept], seed=seed)
    torch.manual_seed(seed)
    with torch.no_grad():  # stand-in for training: move the zero-initialised B matrices
        for name, parameter in module.trained.items():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return module


def test_untrained_adapter_is_the_original_model_and_only_lora_tensors_train():
    module = LoRA(load_pipeline(TOYWORLD_MODEL), LoRAConfig(), ["circle"])
    assert module.trained and all("lora_" in n and ".attn2." in n for n in module.trained)
    assert torch.equal(module.generate(PROMPTS, SEEDS, FAST), generate(load_pipeline(TOYWORLD_MODEL), PROMPTS, SEEDS, FAST))


def test_saved_lora_loads_into_a_plain_pipeline_and_reproduces_the_eraser(tmp_path):
    module = trained_eraser("circle", 0)
    erased_images = module.generate(PROMPTS, SEEDS, FAST)
    path = module.save_erased(tmp_path / "erased")
    assert path.name == "pytorch_lora_weights.safetensors" and path.exists()
    pipeline = load_pipeline(TOYWORLD_MODEL)
    base_images = generate(pipeline, PROMPTS, SEEDS, FAST)
    pipeline.load_lora_weights(tmp_path / "erased", adapter_name="circle")
    assert torch.equal(generate(pipeline, PROMPTS, SEEDS, FAST), erased_images)
    assert not torch.equal(base_images, erased_images)


def test_two_erasers_combine_with_set_adapters(tmp_path):
    for concept, seed in (("circle", 0), ("star", 1)):
        trained_eraser(concept, seed).save_erased(tmp_path / concept)
    pipeline = load_pipeline(TOYWORLD_MODEL)
    pipeline.load_lora_weights(tmp_path / "circle", adapter_name="circle")
    pipeline.load_lora_weights(tmp_path / "star", adapter_name="star")
    images = {}
    for active in (["circle"], ["star"], ["circle", "star"]):
        pipeline.set_adapters(active, adapter_weights=[1.0] * len(active))
        images["+".join(active)] = generate(pipeline, PROMPTS, SEEDS, FAST)
    assert not torch.equal(images["circle+star"], images["circle"])
    assert not torch.equal(images["circle+star"], images["star"])


def test_a_lora_of_another_shape_or_layout_is_refused(tmp_path):
    from erasure.weights import DeltaError

    trained_eraser("circle", 0).save_erased(tmp_path / "rank4")
    module = LoRA(load_pipeline(TOYWORLD_MODEL), LoRAConfig(rank=8), ["circle"])
    with pytest.raises(DeltaError, match="does not fit this UNet .*another model or with another rank"):
        module.load_erased(tmp_path / "rank4")
    module = LoRA(load_pipeline(TOYWORLD_MODEL), LoRAConfig(target_modules="xattn-kv"), ["circle"])
    with pytest.raises(DeltaError, match="does not fit this UNet .*other target_modules"):
        module.load_erased(tmp_path / "rank4")
    with pytest.raises(DeltaError, match="has no pytorch_lora_weights.safetensors"):
        module.load_erased(tmp_path)


def test_load_erased_restores_the_trained_eraser(tmp_path):
    eraser = trained_eraser("circle", 0)
    eraser.save_erased(tmp_path / "erased")
    module = LoRA(load_pipeline(TOYWORLD_MODEL), LoRAConfig(prompt_template="a {concept}"), ["circle"])
    module.load_erased(tmp_path / "erased")
    assert torch.equal(module.generate(PROMPTS, SEEDS, FAST), eraser.generate(PROMPTS, SEEDS, FAST))


def test_the_ablation_objective_optimises_and_clips_as_concept_ablation_and_the_esd_objective_as_esd():
    esd = LoRA(load_pipeline(TOYWORLD_MODEL), LoRAConfig(lr=1e-3), ["circle"])
    assert type(esd.configure_optimizers()) is torch.optim.Adam and esd.gradient_clip_val() is None
    ablation = LoRA(load_pipeline(TOYWORLD_MODEL), LoRAConfig(objective="ablation", lr=1e-3), ["circle"])
    optimizer = ablation.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["weight_decay"] == 1e-2
    assert ablation.gradient_clip_val() == 1.0


def test_the_start_token_detach_reaches_the_lora_wrapped_projections():
    module = LoRA(load_pipeline(TOYWORLD_MODEL), LoRAConfig(objective="ablation", target_modules="xattn-kv"), ["circle"])
    with torch.no_grad():
        for name, parameter in module.trained.items():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    x_t, t, embeds = torch.randn(2, 4, 16, 16), torch.tensor([300, 600]), module.encode(["a red circle", "a square"])
    gradients, predictions = {}, {}
    for detach in (False, True):
        module.zero_grad()
        with start_token_detached(module.denoiser) if detach else contextlib.nullcontext():
            predictions[detach] = module.predict(x_t, t, embeds)
        predictions[detach].square().mean().backward()
        gradients[detach] = torch.cat([p.grad.flatten() for p in module.trained.values()])
    assert torch.equal(predictions[True], predictions[False])
    assert not torch.allclose(gradients[True], gradients[False])

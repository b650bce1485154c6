"""method.adapter=lora: the LoRA parameterisation of ESD's, Concept Ablation's and AdvUnlearn's trained weights,
saved as a diffusers LoRA folder."""

import contextlib

import pytest
import torch

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.generation import Sampler, generate
from erasure.methods.ablation import Ablation, AblationConfig, start_token_detached
from erasure.methods.esd import ESD, ESDConfig

PROMPTS, SEEDS, FAST = ["a circle", "a star", "a red square"], [0, 1, 2], Sampler(steps=8)


def lora_esd(concepts=("circle",), seed=0, **options) -> ESD:
    """ESD through a LoRA on every cross-attention projection (recipe lora's parameterisation)."""
    config = ESDConfig(adapter="lora", lora_targets="xattn", lr=1e-3, batch_size=4, **options)
    return ESD(load_pipeline(TOYWORLD_MODEL), config, list(concepts), seed=seed)


def trained_eraser(concept: str, seed: int) -> ESD:
    module = lora_esd([concept], seed, prompt_template="a {concept}")
    torch.manual_seed(seed)
    with torch.no_grad():  # stand-in for training: move the zero-initialised B matrices
        for name, parameter in module.trained.items():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return module


def test_untrained_adapter_is_the_original_model_and_only_lora_tensors_train():
    module = lora_esd()
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
    module = lora_esd(rank=8)
    with pytest.raises(DeltaError, match="does not fit this UNet2DConditionModel .*another model or with another rank"):
        module.load_erased(tmp_path / "rank4")
    module = ESD(load_pipeline(TOYWORLD_MODEL), ESDConfig(adapter="lora", lora_targets="xattn-kv"), ["circle"])
    with pytest.raises(DeltaError, match="does not fit this UNet2DConditionModel .*other lora_targets"):
        module.load_erased(tmp_path / "rank4")
    with pytest.raises(DeltaError, match="has no pytorch_lora_weights.safetensors"):
        module.load_erased(tmp_path)


def test_load_erased_restores_the_trained_eraser(tmp_path):
    eraser = trained_eraser("circle", 0)
    eraser.save_erased(tmp_path / "erased")
    module = lora_esd(prompt_template="a {concept}")
    module.load_erased(tmp_path / "erased")
    assert torch.equal(module.generate(PROMPTS, SEEDS, FAST), eraser.generate(PROMPTS, SEEDS, FAST))


def test_each_method_keeps_its_optimiser_and_its_layers_through_the_adapter():
    esd = lora_esd()
    assert type(esd.configure_optimizers()) is torch.optim.Adam and esd.gradient_clip_val() is None
    ablation = Ablation(load_pipeline(TOYWORLD_MODEL), AblationConfig(adapter="lora", lr=1e-3), ["circle"])
    optimizer = ablation.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["weight_decay"] == 1e-2
    assert ablation.gradient_clip_val() == 1.0
    # lora_targets=trained: the method's own layers (Concept Ablation's default parameters: the keys and values)
    assert ablation.trained and all("lora_" in n and (".to_k." in n or ".to_v." in n) for n in ablation.trained)
    assert set(optimizer.param_groups[0]["params"]) == set(ablation.trained.values())


def test_the_start_token_detach_reaches_the_lora_wrapped_projections():
    module = Ablation(load_pipeline(TOYWORLD_MODEL), AblationConfig(adapter="lora"), ["circle"])
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


def test_the_command_line_gives_the_adapter_to_ablation_and_advunlearn_and_refuses_it_where_it_cannot_go():
    from erasure.config import ConfigError, load_config

    ablation = load_config(["recipe=ablation", "method.adapter=lora", "method.rank=8"]).method
    assert (ablation.name, ablation.adapter, ablation.rank) == ("ablation", "lora", 8)
    lora = load_config(["recipe=lora"]).method
    assert (lora.name, lora.adapter, lora.lora_targets) == ("esd", "lora", "xattn")
    assert load_config(["recipe=advunlearn", "method.adapter=lora", "method.train_method=xattn"]).method.adapter == "lora"
    with pytest.raises(ConfigError, match="method.adapter=lora wraps UNet projections: use method.train_method=xattn"):
        load_config(["recipe=advunlearn", "method.adapter=lora"])
    with pytest.raises(ConfigError, match="unknown key 'method.adapter'"):
        load_config(["recipe=uce", "method.adapter=lora"])
    with pytest.raises(ConfigError, match="invalid value for 'method.adapter': 'dora'"):
        load_config(["recipe=esd", "method.adapter=dora"])

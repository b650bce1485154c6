"""Real SD architectures (random weights, 8x8 latents): every method's step runs with the true
layer names, widths, 77-token context and prediction type."""

import pytest
import torch

from erasure.architectures import architecture_config, build_random_pipeline
from erasure.generation import Sampler, generate
from erasure.methods.ablation import Ablation, AblationConfig, Anchors, ablation_loss
from erasure.methods.esd import ESD, ESDConfig, esd_loss
from erasure.methods.lora import LoRA, LoRAConfig
from erasure.methods.uce import UCE, UCEConfig

LATENT = 8
pytestmark = pytest.mark.architecture


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def pipeline(request):
    return build_random_pipeline(request.param, sample_size=LATENT)


def restore(module):
    with torch.no_grad():
        for name, parameter in module.trained.items():
            parameter.copy_(module.original[name])


def test_architecture_matches_its_config(pipeline):
    width = pipeline.text_encoder.config.hidden_size
    assert pipeline.unet.config.cross_attention_dim == width
    to_k = [m for n, m in pipeline.unet.named_modules() if n.endswith("attn2.to_k")]
    assert len(to_k) == 16 and all(m.in_features == width for m in to_k)  # SD-1.x/2.x: 16 cross-attention layers
    assert pipeline.tokenizer.model_max_length == 77


def test_esd_step(pipeline):
    module = ESD(pipeline, ESDConfig(train_method="esd-x", ddim_steps=3, batch_size=1, lr=1e-4), ["circle"])
    loss = esd_loss(module, module.config)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in module.trained.values())
    restore(module)


def test_ablation_step(pipeline, tmp_path):
    module = Ablation(pipeline, AblationConfig(anchor="square", anchor_prompts=["a square"], num_anchor_images=1,
                                                 anchor_steps=2, batch_size=1, variant="noise"),
                      ["circle"])
    anchors = Anchors.load_or_generate(module, module.config, tmp_path / "anchors.safetensors")
    loss = ablation_loss(module, module.config, anchors)
    loss.backward()
    assert torch.isfinite(loss)
    restore(module)


def test_uce_edit(pipeline):
    module = UCE(pipeline, UCEConfig(preserve=["square"]), ["circle"])
    module.edit()
    assert len(module.changed_tensors()) == 32  # 16 to_k + 16 to_v
    restore(module)


def test_sampling(pipeline):
    images = generate(pipeline, ["a circle"], [0], Sampler(steps=2), resolution=LATENT * pipeline.vae_scale_factor)
    assert images.shape == (1, 64, 64, 3)


def test_prediction_types():
    assert architecture_config("sd15")["scheduler"]["prediction_type"] == "epsilon"
    assert architecture_config("sd21")["scheduler"]["prediction_type"] == "v_prediction"


def test_lora_step(pipeline):
    module = LoRA(pipeline, LoRAConfig(ddim_steps=2, batch_size=1), ["circle"])
    loss = esd_loss(module, module.config)
    loss.backward()
    assert torch.isfinite(loss) and all(".attn2." in n for n in module.trained)
    pipeline.unet.delete_adapters("eraser")  # last test of the module: PEFT leaves its layer wrappers

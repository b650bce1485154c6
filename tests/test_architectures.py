"""Real SD architectures (random weights, 8x8 latents): every method's step runs with the true
layer names, widths, 77-token context and prediction type. SDXL and FLUX.1-dev: their full-size
modules on the meta device against the published parameter counts, and small random-weight
pipelines sampling through their own ``__call__``."""

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from erasure.architectures import architecture_config, architecture_family
from erasure.toyworld.real_architectures import (
    build_random_flux_pipeline,
    build_random_pipeline,
    build_random_sdxl_pipeline,
    t5_tokenizer,
)
from erasure.generation import Sampler, generate
from erasure.methods.ablation import Ablation, AblationConfig, Anchors, ablation_loss
from erasure.methods.esd import ESD, ESDConfig, esd_loss
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
    module = ESD(pipeline, ESDConfig(adapter="lora", lora_targets="xattn", ddim_steps=2, batch_size=1), ["circle"])
    loss = esd_loss(module, module.config)
    loss.backward()
    assert torch.isfinite(loss) and all(".attn2." in n for n in module.trained)
    pipeline.unet.delete_adapters("eraser")  # last test of the module: PEFT leaves its layer wrappers


# Published parameter counts (each also recounted by hand from the layer shapes):
# SDXL base 1.0: UNet 2,567,463,684 (the 1680 tensors of sd_xl_base_1.0.safetensors), CLIP-L text 123,060,480,
# OpenCLIP bigG text with projection 694,659,840, VAE 83,653,863; FLUX.1-dev: transformer 11,901,408,320
# (FLUX.1-schnell's 11,891,178,560 + the 10,229,760 of the guidance embedder), T5-XXL encoder 4,762,310,656,
# CLIP-L text 123,060,480, VAE 83,819,683.
SDXL_UNET, CLIP_L, OPENCLIP_BIGG, SDXL_VAE = 2_567_463_684, 123_060_480, 694_659_840, 83_653_863
FLUX_TRANSFORMER, T5_XXL, FLUX_VAE = 11_901_408_320, 4_762_310_656, 83_819_683


def parameter_count(module):
    return sum(p.numel() for p in module.parameters())


def layer_count(clip):
    return sum(name.rpartition(".")[0].endswith("encoder.layers") for name, _ in clip.named_modules())


def test_families():
    assert [architecture_family(n) for n in ("sd15", "sd21", "sdxl", "flux")] == ["sd", "sd", "sdxl", "flux"]
    assert architecture_config("sdxl")["scheduler"]["prediction_type"] == "epsilon"
    for name in ("sdxl", "flux"):
        with pytest.raises(ValueError, match=f"build_random_{name}_pipeline"):
            build_random_pipeline(name)


def test_sdxl_unet_at_full_size():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**architecture_config("sdxl")["unet"])
    assert parameter_count(unet) == SDXL_UNET
    to_k = {n: m for n, m in unet.named_modules() if n.endswith("attn2.to_k")}
    # transformer depths 2 and 10 per down block, 10 in the middle, 10 and 2 per up block: 70 cross-attentions
    assert len(to_k) == 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2
    assert all(m.in_features == 2048 for m in to_k.values())
    assert to_k["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"].out_features == 640
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 10
    assert unet.add_embedding.linear_1.in_features == 2816 == 6 * 256 + 1280  # 6 size/crop ids + pooled bigG


def test_sdxl_text_encoders_and_vae_at_full_size():
    config = architecture_config("sdxl")
    with torch.device("meta"):
        clip_l = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
        bigg = CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"]))
        vae = AutoencoderKL(**config["vae"])
    assert (parameter_count(clip_l), parameter_count(bigg), parameter_count(vae)) == (CLIP_L, OPENCLIP_BIGG, SDXL_VAE)
    assert (layer_count(clip_l), layer_count(bigg)) == (12, 32)
    assert bigg.text_projection.weight.shape == (1280, 1280)
    assert clip_l.config.hidden_size + bigg.config.hidden_size == config["unet"]["cross_attention_dim"]


def test_flux_transformer_at_full_size():
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**architecture_config("flux")["transformer"])
    assert parameter_count(transformer) == FLUX_TRANSFORMER
    assert len(transformer.transformer_blocks) == 19 and len(transformer.single_transformer_blocks) == 38
    assert transformer.transformer_blocks[0].attn.add_k_proj.weight.shape == (3072, 3072)
    assert transformer.context_embedder.in_features == 4096 and transformer.x_embedder.in_features == 64
    assert transformer.time_text_embed.text_embedder.linear_1.in_features == 768
    assert transformer.time_text_embed.guidance_embedder.linear_1.out_features == 3072  # FLUX.1-dev: guidance input


def test_flux_text_encoders_and_vae_at_full_size():
    config = architecture_config("flux")
    with torch.device("meta"):
        clip_l = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
        t5 = T5EncoderModel(T5Config(**config["text_encoder_2"]))
        vae = AutoencoderKL(**config["vae"])
    assert (parameter_count(clip_l), parameter_count(t5), parameter_count(vae)) == (CLIP_L, T5_XXL, FLUX_VAE)
    assert len(t5.encoder.block) == 24
    assert t5.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.shape == (10240, 4096)  # gated-gelu
    assert vae.config.latent_channels == 16 and vae.quant_conv is None and vae.post_quant_conv is None


def test_t5_tokenizer_encodes_toy_words_as_single_pieces():
    tokenizer = t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.model_max_length) == (0, 1, 512)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("a red circle.").input_ids)
    assert pieces == ["▁a", "▁red", "▁circle", ".", "</s>"]
    assert len(tokenizer) < architecture_config("flux")["text_encoder_2"]["vocab_size"]


def sample(pipeline, seed, **kwargs):
    images = pipeline("a red circle", height=64, width=64, num_inference_steps=2, output_type="np",
                      generator=torch.Generator().manual_seed(seed), **kwargs).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0
    return images


def test_small_sdxl_pipeline_samples():
    pipeline = build_random_sdxl_pipeline(sample_size=8, small=True)
    assert isinstance(pipeline, StableDiffusionXLPipeline) and pipeline.vae_scale_factor == 8
    images = sample(pipeline, 0)
    assert np.array_equal(images, sample(build_random_sdxl_pipeline(sample_size=8, small=True), 0))
    assert not np.array_equal(images, sample(pipeline, 1))


def test_small_flux_pipeline_samples():
    pipeline = build_random_flux_pipeline(sample_size=8, small=True)
    assert isinstance(pipeline, FluxPipeline) and pipeline.vae.config.latent_channels == 16
    images = sample(pipeline, 0, max_sequence_length=16)
    rebuilt = build_random_flux_pipeline(sample_size=8, small=True)
    assert np.array_equal(images, sample(rebuilt, 0, max_sequence_length=16))
    assert not np.array_equal(images, sample(pipeline, 1, max_sequence_length=16))

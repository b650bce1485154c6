import shutil

import pytest
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, T5EncoderModel

from erasure.bundle import TOYWORLD_FLUX_MODEL, TOYWORLD_MODEL, ModelLoadError, load_pipeline


def test_shipped_toy_model_loads_with_plain_diffusers_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipeline = StableDiffusionPipeline.from_pretrained(TOYWORLD_MODEL)
    assert pipeline.safety_checker is None
    assert isinstance(pipeline.unet, UNet2DConditionModel) and isinstance(pipeline.vae, AutoencoderKL)
    assert isinstance(pipeline.text_encoder, CLIPTextModel)
    assert any(name.endswith("attn2.to_k") for name, _ in pipeline.unet.named_modules())


def test_shipped_flux_toy_model_loads_with_plain_diffusers_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipeline = FluxPipeline.from_pretrained(TOYWORLD_FLUX_MODEL)
    assert isinstance(pipeline.transformer, FluxTransformer2DModel) and isinstance(pipeline.vae, AutoencoderKL)
    assert isinstance(pipeline.text_encoder, CLIPTextModel) and isinstance(pipeline.text_encoder_2, T5EncoderModel)
    assert pipeline.transformer.config.joint_attention_dim == pipeline.text_encoder_2.config.d_model
    assert any(name.endswith("attn.add_k_proj") for name, _ in pipeline.transformer.named_modules())


def test_shipped_weights_are_safetensors_and_small():
    files = [p for p in TOYWORLD_MODEL.parent.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in weights) <= 32 * 2**20  # SD, FLUX, classifier and the toy CLIP


def test_load_pipeline_gives_the_components(toy_pipeline):
    assert toy_pipeline.unet.config.cross_attention_dim == toy_pipeline.text_encoder.config.hidden_size
    assert toy_pipeline.tokenizer.model_max_length == toy_pipeline.text_encoder.config.max_position_embeddings


def test_missing_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist; set model.path") as error:
        load_pipeline(tmp_path / "nowhere")
    assert "\n" not in str(error.value)


def test_incomplete_folder_names_the_missing_parts(tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(TOYWORLD_MODEL, folder)
    shutil.rmtree(folder / "unet")
    with pytest.raises(ModelLoadError, match="incomplete: missing unet"):
        load_pipeline(folder)


def test_folder_without_model_index_is_rejected(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json is missing"):
        load_pipeline(tmp_path)


def test_corrupt_weights_are_a_one_line_error(tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(TOYWORLD_MODEL, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="could not load the model") as error:
        load_pipeline(folder)
    assert "\n" not in str(error.value)

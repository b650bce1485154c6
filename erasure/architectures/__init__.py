"""Real diffusion architectures built from their configs with random weights: Stable Diffusion
1.4/1.5 and 2.1 (:func:`build_random_pipeline`), SDXL base 1.0 (:func:`build_random_sdxl_pipeline`)
and FLUX.1-dev (:func:`build_random_flux_pipeline`).

No weights can be downloaded here, so the code paths of real checkpoints (layer names,
dimensions, 77-token context, prediction type) are tested on these: same modules, random
values. The tokenizers are the caller's (CLIP's and T5's vocabularies cannot be downloaded either),
padded to the architecture's context: :mod:`erasure.toyworld.real_architectures` builds them with
the toy world's (the same ids on every build, so a seed fixes the images). :func:`build_t5_tokenizer`
makes a T5 (Unigram) tokenizer over any list of words.
Each JSON names its family ("sd" when absent) and, under "_source", where its values come from.
"""

from __future__ import annotations

import copy
import json
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

ARCHITECTURES = {p.stem: p for p in Path(__file__).parent.glob("*.json")}


def architecture_config(name: str) -> dict:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return json.loads(ARCHITECTURES[name].read_text())


def architecture_family(name: str) -> str:
    """"sd" (SD-1.x/2.x, :func:`build_random_pipeline`), "sdxl" or "flux"."""
    return architecture_config(name).get("family", "sd")


def tiny(config: dict) -> dict:
    """The same architecture at small widths and depths: the same classes, block types, context
    width (so presets detect it), token context and prediction type; for fast end-to-end tests."""
    blocks = len(config["unet"]["block_out_channels"])
    return {
        **config,
        "unet": {**config["unet"], "block_out_channels": [32] * (blocks - 2) + [64, 64], "layers_per_block": 1},
        "text_encoder": {**config["text_encoder"], "num_hidden_layers": 1, "intermediate_size": 256},
        "vae": {**config["vae"], "block_out_channels": [32] * len(config["vae"]["block_out_channels"]),
                "layers_per_block": 1},
    }


SMALL_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "projection_dim": 32}


def tiny_sdxl(config: dict) -> dict:
    """SDXL at small widths and depths: the same block types, two CLIP encoders whose hidden states
    concatenate into the cross-attention context, and the text_time added embedding
    (6 size/crop ids x ``addition_time_embed_dim`` + the pooled projection of the second encoder)."""
    unet = config["unet"]
    time_dim = 8
    return {
        **config,
        "unet": {**unet, "block_out_channels": [32, 64, 64], "layers_per_block": 1, "transformer_layers_per_block": 1,
                 "attention_head_dim": [2, 4, 4], "cross_attention_dim": 2 * SMALL_CLIP["hidden_size"],
                 "addition_time_embed_dim": time_dim,
                 "projection_class_embeddings_input_dim": 6 * time_dim + SMALL_CLIP["projection_dim"]},
        "text_encoder": {**config["text_encoder"], **SMALL_CLIP},
        "text_encoder_2": {**config["text_encoder_2"], **SMALL_CLIP},
        "vae": {**config["vae"], "block_out_channels": [32] * len(config["vae"]["block_out_channels"]),
                "layers_per_block": 1},
    }


def tiny_flux(config: dict) -> dict:
    """FLUX at small widths and depths: one double- and one single-stream block of 2 heads of 16
    (rope axes summing to 16), a one-layer T5 whose width is the joint attention width, a small CLIP
    whose pooled output is the pooled projection width, and a 16-channel VAE (packed 2x2: 64 inputs)."""
    t5 = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4}
    return {
        **config,
        "transformer": {**config["transformer"], "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                        "num_attention_heads": 2, "axes_dims_rope": [4, 6, 6], "joint_attention_dim": t5["d_model"],
                        "pooled_projection_dim": SMALL_CLIP["hidden_size"]},
        "text_encoder": {**config["text_encoder"], **SMALL_CLIP},
        "text_encoder_2": {**config["text_encoder_2"], **t5},
        "vae": {**config["vae"], "block_out_channels": [32] * len(config["vae"]["block_out_channels"]),
                "layers_per_block": 1},
    }


def padded(tokenizer, max_length: int):
    """``tokenizer``, set to pad and truncate to ``max_length`` tokens (it changes: pass one of its own)."""
    tokenizer.model_max_length = max_length
    return tokenizer


def clip_text_config(config: dict, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(**config, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def build_t5_tokenizer(words: list[str], model_max_length: int = 512) -> T5TokenizerFast:
    """A T5 tokenizer (the tokenizers-backed Unigram ``T5TokenizerFast`` FluxPipeline declares) over
    ``words``: T5's special ids (<pad> 0, </s> 1, <unk> 2), each word one piece "▁word" and,
    capitalised, "▁Word" (T5 is case-sensitive), and single letters, digits and punctuation so any
    other text still encodes. No sentinel <extra_id_*> tokens; ids stay far below 32128."""
    words = [w for w in words if w.isalnum()]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -1.0) for word in words]
    pieces += [("▁" + word.capitalize(), -1.0) for word in words if word.capitalize() != word]
    pieces += [(char, -10.0) for char in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def build_random_pipeline(name: str, tokenizer: CLIPTokenizer, sample_size: int | None = None, seed: int = 0,
                          small: bool = False) -> StableDiffusionPipeline:
    """The SD-1.x/2.x architecture ``name`` with random weights and ``tokenizer`` (padded to its
    context); ``sample_size`` (latent pixels) shrinks the default, ``small`` the widths and depths (:func:`tiny`)."""
    family = architecture_family(name)
    if family != "sd":
        raise ValueError(f"{name!r} is an {family.upper()} architecture, not SD-1.x/2.x: "
                         f"build it with build_random_{family}_pipeline()")
    config = tiny(architecture_config(name)) if small else architecture_config(name)
    torch.manual_seed(seed)
    unet_config = dict(config["unet"], sample_size=sample_size or config["unet"]["sample_size"])
    tokenizer = padded(tokenizer, config["text_encoder"]["max_position_embeddings"])
    text_encoder = CLIPTextModel(clip_text_config(config["text_encoder"], tokenizer))
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL(**config["vae"]), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**unet_config).eval(), scheduler=DDIMScheduler(**config["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_random_sdxl_pipeline(tokenizer: CLIPTokenizer, sample_size: int | None = None, seed: int = 0,
                               small: bool = False) -> StableDiffusionXLPipeline:
    """SDXL base 1.0 with random weights; both tokenizers ``tokenizer``, padded to 77; ``sample_size``
    (latent pixels) shrinks the default 128, ``small`` the widths and depths (:func:`tiny_sdxl`).
    DDIM as for the SD ones; no watermarker."""
    config = architecture_config("sdxl")
    config = tiny_sdxl(config) if small else config
    torch.manual_seed(seed)
    unet_config = dict(config["unet"], sample_size=sample_size or config["unet"]["sample_size"])
    tokenizer = padded(tokenizer, config["text_encoder"]["max_position_embeddings"])
    tokenizer_2 = copy.deepcopy(tokenizer)
    text_encoder = CLIPTextModel(clip_text_config(config["text_encoder"], tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(config["text_encoder_2"], tokenizer_2))
    pipeline = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**config["vae"]).eval(), unet=UNet2DConditionModel(**unet_config).eval(),
        text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        scheduler=DDIMScheduler(**config["scheduler"]), add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_random_flux_pipeline(tokenizer: CLIPTokenizer, t5_tokenizer: T5TokenizerFast, sample_size: int | None = None,
                               seed: int = 0, small: bool = False, blocks: tuple[int, int] | None = None) -> FluxPipeline:
    """FLUX.1-dev with random weights, the CLIP ``tokenizer`` padded to 77 and ``t5_tokenizer`` to 512
    tokens; ``sample_size`` (latent pixels) sets the default image size (FluxPipeline's own default is
    128; an attribute, not saved with the pipeline), ``small`` shrinks widths and depths (:func:`tiny_flux`),
    ``blocks`` sets the transformer's (double-stream, single-stream) depths alone (for what reads none of them)."""
    config = architecture_config("flux")
    config = tiny_flux(config) if small else config
    if blocks:
        config["transformer"] = {**config["transformer"], "num_layers": blocks[0], "num_single_layers": blocks[1]}
    torch.manual_seed(seed)
    tokenizer = padded(tokenizer, config["text_encoder"]["max_position_embeddings"])
    tokenizer_2 = padded(t5_tokenizer, config["tokenizer_2"]["model_max_length"])
    text_encoder = CLIPTextModel(clip_text_config(config["text_encoder"], tokenizer))
    text_encoder_2 = T5EncoderModel(T5Config(**config["text_encoder_2"], pad_token_id=tokenizer_2.pad_token_id,
                                             eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0))
    pipeline = FluxPipeline(
        vae=AutoencoderKL(**config["vae"]).eval(), transformer=FluxTransformer2DModel(**config["transformer"]).eval(),
        text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(**config["scheduler"]),
    )
    if sample_size:
        pipeline.default_sample_size = sample_size
    pipeline.set_progress_bar_config(disable=True)
    return pipeline

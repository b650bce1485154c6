"""The real architectures of :mod:`erasure.architectures` (SD-1.x/2.x, SDXL, FLUX.1-dev; random
weights) with the toy world's tokenizers: its shipped CLIP tokenizer (the same ids on every build, so
a seed fixes the images; its ids lie inside CLIP's vocabulary) and a T5 tokenizer over its words.
No real vocabulary can be downloaded here; the tests and benchmarks build real sizes through this."""

from __future__ import annotations

from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import T5TokenizerFast

from erasure import architectures
from erasure.toyworld.captions import vocabulary
from erasure.toyworld.tokenizer import shipped_or_new_tokenizer


def t5_tokenizer(model_max_length: int = 512) -> T5TokenizerFast:
    """A T5 tokenizer over the toy world's words (:func:`erasure.architectures.build_t5_tokenizer`)."""
    return architectures.build_t5_tokenizer(vocabulary(), model_max_length)


def build_random_pipeline(name: str, **options) -> StableDiffusionPipeline:
    return architectures.build_random_pipeline(name, shipped_or_new_tokenizer(), **options)


def build_random_sdxl_pipeline(**options) -> StableDiffusionXLPipeline:
    return architectures.build_random_sdxl_pipeline(shipped_or_new_tokenizer(), **options)


def build_random_flux_pipeline(**options) -> FluxPipeline:
    return architectures.build_random_flux_pipeline(shipped_or_new_tokenizer(), t5_tokenizer(), **options)

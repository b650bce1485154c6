"""The shipped toy-world models: v3 reads the frozen toy CLIP's text tower, as SD reads CLIP's; v2 (its
UNet's starting point) learned the instruction language (caption grammar v2) in its own text encoder.

``checkpoints/toyworld-v1`` is the first model, pretrained on captions without instruction words;
v2 continued its pretraining on today's grammar, so v1's token-embedding table is the starting point
of every row of v2's.
"""

import torch
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from erasure.bundle import SHIPPED_ROOT, TOYWORLD_MODEL
from erasure.methods.instruction import InstructionConfig

V1_MODEL = SHIPPED_ROOT / "checkpoints" / "toyworld-v1" / "sd"
V2_MODEL = SHIPPED_ROOT / "checkpoints" / "toyworld-v2" / "sd"
EMBEDDING = "embeddings.token_embedding.weight"
# every word of the instruction baseline's templates and of the captions' absence and request phrases
INSTRUCTION_WORDS = sorted(
    {w for t in InstructionConfig().templates.values() for w in t.lower().replace(".", " ").replace(",", " ").split()
     if not w.startswith("{")}
    | set("please forget anything about help me generate draw do not without no but any shape object thing the".split())
)


def token_embeddings(model) -> torch.Tensor:
    return load_file(model / "text_encoder" / "model.safetensors")[EMBEDDING]


def relative_change(ids: list[int]) -> torch.Tensor:
    start, v2 = token_embeddings(V1_MODEL)[ids], token_embeddings(V2_MODEL)[ids]
    return (v2 - start).norm(dim=1) / start.norm(dim=1)


def test_every_instruction_word_moved_from_its_initial_embedding_in_v2():
    tokenizer = CLIPTokenizer.from_pretrained(TOYWORLD_MODEL / "tokenizer")
    words = INSTRUCTION_WORDS
    assert {"please", "forget", "without", "any", "generate", "help", "draw", "shape"} <= set(words)
    ids = tokenizer.convert_tokens_to_ids([w + "</w>" for w in words])
    # control: byte tokens no caption uses get no gradient; AdamW's decay alone shrinks them by a few %
    unused = tokenizer.convert_tokens_to_ids(["q</w>", "z</w>", "x</w>", "j</w>"])
    decay_only = relative_change(unused)
    assert decay_only.max() < 0.05, decay_only
    change = relative_change(ids)
    assert (change > 5 * decay_only.max()).all(), {w: round(float(c), 3) for w, c in zip(words, change)}


def test_instruction_words_left_the_random_initialisation_norm_in_v2():
    tokenizer = CLIPTokenizer.from_pretrained(TOYWORLD_MODEL / "tokenizer")
    table = token_embeddings(V2_MODEL)
    instruction = table[tokenizer.convert_tokens_to_ids([w + "</w>" for w in ("please", "forget", "without", "any",
                                                                              "draw", "help", "generate", "shape")])]
    untouched = table[tokenizer.convert_tokens_to_ids(["q</w>", "z</w>", "x</w>", "j</w>"])]
    # v1 left these rows at the random initialisation's norm (0.20-0.24, like the untouched ones)
    assert instruction.norm(dim=1).median() > 1.4 * untouched.norm(dim=1).median()
    assert instruction.norm(dim=1).min() > untouched.norm(dim=1).max()


def test_the_plain_flux_pipeline_called_as_readme_says_draws_the_asked_colour():
    """README's plain-diffusers call of the FLUX toy model (true CFG 6, an empty negative prompt and
    max_sequence_length=32, the toy T5's length): the classifier sees the asked colour."""
    import numpy as np
    from diffusers import FluxPipeline

    from erasure.bundle import TOYWORLD_FLUX_MODEL, resolve_path
    from evaluation.protocols.toyworld import ToyWorldEvaluator, ToyWorldEvaluatorConfig

    pipe = FluxPipeline.from_pretrained(TOYWORLD_FLUX_MODEL)
    pipe.set_progress_bar_config(disable=True)
    colours = ["red", "blue", "green", "yellow", "purple", "orange"]
    images = [pipe(f"a {colour} circle", true_cfg_scale=6, negative_prompt="", max_sequence_length=32, height=32,
                   width=32, num_inference_steps=25, generator=torch.Generator().manual_seed(k)).images[0]
              for k, colour in enumerate(colours)]
    judge = ToyWorldEvaluator(ToyWorldEvaluatorConfig(str(resolve_path("checkpoints/toyworld/classifier"))))
    seen = judge.sees(torch.from_numpy(np.stack([np.asarray(image) for image in images])), colours)
    assert int(seen.sum()) >= 5, seen.tolist()


def test_the_plain_sd_pipeline_called_as_the_docs_say_draws_the_asked_shape():
    """docs/getting-started.md's plain-diffusers call of the SD toy model: the classifier sees the asked shape."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from erasure.bundle import resolve_path
    from evaluation.protocols.toyworld import ToyWorldEvaluator, ToyWorldEvaluatorConfig

    pipe = StableDiffusionPipeline.from_pretrained(TOYWORLD_MODEL)
    pipe.set_progress_bar_config(disable=True)
    shapes = ["circle", "square", "triangle", "star", "heart", "cross"]
    images = [pipe(f"a striped red {shape}", num_inference_steps=25, guidance_scale=6.0,
                   generator=torch.Generator().manual_seed(k)).images[0] for k, shape in enumerate(shapes)]
    judge = ToyWorldEvaluator(ToyWorldEvaluatorConfig(str(resolve_path("checkpoints/toyworld/classifier"))))
    seen = judge.sees(torch.from_numpy(np.stack([np.asarray(image) for image in images])), shapes)
    assert int(seen.sum()) >= 5, seen.tolist()


def test_the_shipped_models_text_encoder_slot_is_the_frozen_toy_clip_text_tower():
    """The shipped model (toyworld v3) is SD's recipe in miniature: its UNet was trained under the toy CLIP's
    text tower, frozen."""
    tower = {name.removeprefix("text_model."): value for name, value in
             load_file(TOYWORLD_MODEL.parent / "clip" / "model.safetensors").items() if name.startswith("text_model.")}
    slot = load_file(TOYWORLD_MODEL / "text_encoder" / "model.safetensors")
    slot = {name.removeprefix("text_model."): value for name, value in slot.items()}
    assert slot.keys() == tower.keys() and all(torch.equal(slot[name], tower[name]) for name in slot)

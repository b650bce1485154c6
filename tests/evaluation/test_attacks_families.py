"""Attacks on SDXL and FLUX (tiny random pipelines): every text encoder learns the new tokens,
searches draw from the vocabulary of the tokenizer that makes the denoiser's context, the embedding
attack reaches generation and leaves it as it was, and every attack leaves the model's weights alone.
With random weights the success rates mean nothing; their form is checked, not their value."""

import math
from dataclasses import replace

import pytest
import torch

from erasure.toyworld.real_architectures import build_random_flux_pipeline, build_random_sdxl_pipeline
from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.families import Conditioning
from erasure.generation import Sampler
from erasure.methods.instruction import Instruction, InstructionConfig
from erasure.methods.uce import UCE, UCEConfig
from evaluation.attacks import (
    ATTACKS, AttackConfig, AttackResult, EmbeddingOptions, InversionOptions, PEZOptions, RelearnOptions,
    RingABellOptions, SoftPromptOptions, Target, UnlearnDiffAtkOptions, measure_attack, ring_a_bell,
)
from evaluation.attacks.base import original_images
from evaluation.attacks.embedding import FreeEmbeddings, optimise
from evaluation.attacks.relearn import relearned_parameters
from evaluation.attacks.ring_a_bell import encode_ids
from evaluation.attacks.tokens import PlaceholderTokens, text_encoders, word_vocabulary
from evaluation.attacks.prefix import split_tables
from evaluation.protocols.toyworld import toyworld_suites

FAST = Sampler(steps=2)
ROWS = toyworld_suites(["circle"])["target"][1:3]  # "a red circle", "an orange circle"
FAMILIES = ["sdxl", "flux"]
BUDGET = AttackConfig(
    steps=2, images=2, batch_size=1, soft_prompt=SoftPromptOptions(tokens=2), embedding=EmbeddingOptions(check_every=1),
    inversion=InversionOptions(budget="toy", steps=2, images=2, batch_size=1),
    unlearndiffatk=UnlearnDiffAtkOptions(tokens=2, timesteps=2, iterations=1),
    pez=PEZOptions(tokens=2, iterations=2, check_every=1),
    ring_a_bell=RingABellOptions(tokens=3, population=4, generations=2),
    relearn=RelearnOptions(steps=[0, 1], control="none"))


def pipeline_of(family: str):
    """A fresh tiny random pipeline (token attacks add tokens to its tokenizers)."""
    if family == "sdxl":
        return build_random_sdxl_pipeline(sample_size=8, small=True)
    return build_random_flux_pipeline(small=True)


def erased(family: str) -> UCE:
    """An eraser with trained tensors (the cross-attention keys and values), at 64 pixels."""
    return UCE(pipeline_of(family), UCEConfig(), ["circle"], resolution=64)


class Parity:
    """Sees the concept in the images whose pixel sum is odd: a verdict that depends on the image."""

    def sees(self, images, concepts):
        return images.long().sum((1, 2, 3)) % 2 == 1


class Never:
    """Sees the concept nowhere (every image is attacked); counts its calls."""

    calls = 0

    def sees(self, images, concepts):
        self.calls += 1
        return torch.zeros(len(images), dtype=torch.bool)


def model_tensors(module) -> dict[str, torch.Tensor]:
    """Copies of every tensor of the pipeline's models; of the token tables only the rows of the
    tokenizers' own vocabularies (an attack's added tokens are its own variables)."""
    vocabulary = {encoder.get_input_embeddings().weight.data_ptr(): tokenizer.vocab_size
                  for tokenizer, encoder in text_encoders(module.pipeline)}
    models = {name: c for name, c in module.pipeline.components.items() if isinstance(c, torch.nn.Module)}

    def kept(tensor: torch.Tensor) -> torch.Tensor:
        rows = vocabulary.get(tensor.data_ptr())
        return (tensor if rows is None else tensor[:rows]).clone()

    return {f"{name}.{key}": kept(tensor) for name, model in models.items()
            for key, tensor in model.state_dict().items()}


def assert_unchanged(module, before: dict[str, torch.Tensor]) -> None:
    """The model's tensors are ``before``'s, and none but the method's own trained tensors trains."""
    after = model_tensors(module)
    assert after.keys() == before.keys()
    assert [key for key in before if not torch.equal(after[key], before[key])] == []
    trained = {id(p) for p in module.trained.values()}
    models = [c for c in module.pipeline.components.values() if isinstance(c, torch.nn.Module)]
    assert not any(p.requires_grad and id(p) not in trained for model in models for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_every_attack_gives_a_rate_and_leaves_the_weights(family, attack):
    module = erased(family)
    before = model_tensors(module)
    result = measure_attack(attack, Target(module, ROWS, FAST, 1, Parity()), BUDGET)
    rate, (low, high) = result.fields["attack_success_rate"], result.fields["attack_success_rate_ci95"]
    assert math.isfinite(rate) and 0 <= low <= rate <= high <= 1
    assert result.images.shape == (2, 64, 64, 3) and len(result.prompts) == 2
    assert all(math.isfinite(loss) for loss in result.losses)
    assert_unchanged(module, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholder_tokens_train_only_their_rows_in_every_text_encoder(family):
    module = erased(family)
    pairs = text_encoders(module.pipeline)
    sizes = [len(tokenizer) for tokenizer, _ in pairs]
    before = [encoder.get_input_embeddings().weight.detach().clone() for _, encoder in pairs]
    tokens = PlaceholderTokens(module.pipeline, "test", 2, "object")
    assert len(tokens.rows) == len(pairs) == 2
    for (tokenizer, encoder), size, rows in zip(pairs, sizes, tokens.rows):
        assert len(tokenizer) == size + 2 and rows.table is encoder.get_input_embeddings().weight
        assert tokenizer(tokens.text, add_special_tokens=False).input_ids == rows.ids
        init = tokenizer("object", add_special_tokens=False).input_ids
        assert torch.equal(rows.table[rows.ids[1]], rows.table[init].mean(0))
    started = [table.detach().clone() for table in tokens.tables]
    condition = module.encode([f"a red {tokens.text}"], cache=False)
    optimizer = torch.optim.Adam(tokens.tables, lr=0.1)
    (condition.embeds.square().mean() + condition.pooled.square().mean()).backward()
    optimizer.step()
    tokens.close()
    for old, start, rows in zip(before, started, tokens.rows):
        table = rows.table.detach()
        kept = torch.ones(len(table), dtype=torch.bool)
        kept[rows.ids] = False
        assert table.shape == old.shape and torch.equal(table[kept], old[kept])  # nothing else moved
        assert all(not torch.equal(table[i], start[i]) for i in rows.ids)  # every new token did, in each encoder
        assert not rows.table.requires_grad


def test_clip_pools_at_the_end_of_text_after_new_tokens():
    """A legacy CLIP config (``eos_token_id`` 2, as SDXL's second encoder and FLUX's CLIP ship) pools
    at the highest token id: after new tokens it would read the pooled vector at a placeholder."""
    pipeline = build_random_sdxl_pipeline(sample_size=8, small=True)
    encoder, tokenizer = pipeline.text_encoder_2, pipeline.tokenizer_2
    encoder.text_model.eos_token_id = 2
    tokens = PlaceholderTokens(pipeline, "test", 1, "object")
    tokens.close()
    ids = tokenizer([f"a red {tokens.text}"], return_tensors="pt").input_ids
    with torch.no_grad():
        output = encoder(ids)
        end = ids[0].tolist().index(tokenizer.eos_token_id)
        assert torch.allclose(output.text_embeds[0], encoder.text_projection(output.last_hidden_state[0, end]), atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attack", ["inversion", "soft_prompt"])
def test_learned_tokens_are_in_every_tokenizer_and_the_prompts(family, attack):
    module = erased(family)
    result = measure_attack(attack, Target(module, ROWS, FAST, 1, Parity()), BUDGET)
    count = 1 if attack == "inversion" else 2
    words = [f"<{attack}-{k}>" for k in range(count)]
    for tokenizer, _ in text_encoders(module.pipeline):
        size = tokenizer.vocab_size  # the added tokens take the ids after the vocabulary
        assert len(tokenizer) == size + count
        assert tokenizer.convert_tokens_to_ids(words) == list(range(size, size + count))
    assert all(" ".join(words) in prompt for prompt in result.prompts) and len(result.losses) == 2
    assert ("circle" in result.prompts[0]) == (attack == "soft_prompt")


@pytest.mark.parametrize("family, concept_at, length", [("sdxl", 3, 77), ("flux", 2, 512)])
def test_free_positions_are_those_of_the_context_tokenizer(family, concept_at, length):
    """SDXL: [BOS, a, red, circle, EOS, padding]; FLUX's T5: [a, red, circle, </s>, padding]."""
    module = erased(family)
    free = FreeEmbeddings(module, ["a red circle"], ["circle"], "concept+end")
    tokenizer = module.family.context_tokenizer
    ids = free.ids[0]
    assert free.context_length == length == len(ids)
    assert free.positions[0].tolist() == list(range(concept_at, length))
    assert ids[concept_at] == tokenizer("circle", add_special_tokens=False).input_ids[0]
    assert ids[concept_at + 1] == tokenizer.eos_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_embedding_substitution_reaches_generation_and_is_undone(family):
    module = erased(family).eval()  # as measure_attack runs attacks
    prompts = [r.prompt for r in ROWS]
    latents = module.encode_images(original_images(module, ROWS, FAST))
    free = FreeEmbeddings(module, prompts, ["circle"] * 2, "concept+end")
    encoded = module.encode(prompts, cache=False)
    condition = free.embeds([1, 0])
    assert isinstance(condition, Conditioning) and torch.equal(condition.embeds, encoded.embeds[[1, 0]])
    plain = module.generate(prompts, [0, 1], FAST)
    with free.substituted():  # before optimisation the substituted context is the prompt's own
        assert torch.equal(module.generate(prompts, [0, 1], FAST), plain)
    optimise(module, free, latents, [0, 1], AttackConfig(batch_size=1, embedding=EmbeddingOptions(lr=0.5)),
             torch.Generator().manual_seed(0), 2)
    other = module.encode(["a blue square"], cache=False)
    with free.substituted():
        attacked = module.encode(prompts, cache=False)
        assert torch.equal(attacked.embeds, free.embeds([0, 1]).embeds.detach())  # the context is the attack's
        assert not torch.equal(attacked.embeds, encoded.embeds)
        assert torch.equal(attacked.pooled, encoded.pooled)  # the pooled vectors are the prompts' own
        assert torch.equal(module.encode(["a blue square"], cache=False).embeds, other.embeds)  # other prompts: as ever
        assert not torch.equal(module.generate(prompts, [0, 1], FAST), plain)
    assert "encode_prompt" not in vars(module.pipeline)
    assert torch.equal(module.generate(prompts, [0, 1], FAST), plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_unlearndiffatk_searches_the_context_tokenizers_whole_vocabulary(family):
    """TextGrad's distributions span the context tokenizer's ids; one check per timestep, then the control."""
    module = erased(family)
    evaluator = Never()
    result = measure_attack("unlearndiffatk", Target(module, ROWS, FAST, 1, evaluator), BUDGET)
    fields = result.fields
    assert fields["attacked_images"] == 2 and fields["iterations_run"] == 2 and fields["judged_images"] == 4
    assert fields["random_control_judged_images"] == 4 and fields["random_control_success_rate"] == 0
    assert evaluator.calls == 1 + 2 + 2  # before the attack, one check per timestep, two random tries
    for prompt, row in zip(result.prompts, ROWS):
        assert prompt != row.prompt and row.prompt.split()[-1] in prompt


@pytest.mark.parametrize("family", FAMILIES)
def test_pez_prefixes_are_words_of_the_context_tokenizer(family):
    module = erased(family)
    evaluator = Never()
    result = measure_attack("pez", Target(module, ROWS, FAST, 1, evaluator), replace(BUDGET, random_control=False))
    assert result.fields["attacked_images"] == 2 and result.fields["iterations_run"] == 2
    assert evaluator.calls == 3  # before the attack and at both checkpoints
    tokenizer = module.family.context_tokenizer
    words = set(word_vocabulary(tokenizer).tolist())
    for prompt, row in zip(result.prompts, ROWS):
        assert prompt.endswith(f" {row.prompt}")
        prefix = tokenizer(prompt[: -len(row.prompt) - 1], add_special_tokens=False).input_ids
        assert len(prefix) == 2 and set(prefix) <= words


@pytest.mark.parametrize("family, searched", [("sdxl", 2), ("flux", 1)])
def test_prefix_searches_use_the_tables_that_share_the_context_vocabulary(family, searched):
    """SDXL: both CLIP tables hold a row per word; FLUX: T5's, CLIP gets the mean of the word's rows."""
    module = erased(family)
    tokenizer = module.family.context_tokenizer
    vocabulary = word_vocabulary(tokenizer)
    tokens = PlaceholderTokens(module.pipeline, "test", 2, "object")
    inside, others = split_tables(tokens, tokenizer, vocabulary)
    tokens.close()
    assert len(inside) == searched and len(others) == 2 - searched and inside[0].tokenizer is tokenizer
    for rows, stand_in in others:
        assert stand_in.shape == (len(vocabulary), rows.table.shape[1])
        circle = vocabulary.tolist().index(tokenizer("circle", add_special_tokens=False).input_ids[0])
        own = rows.tokenizer("circle", add_special_tokens=False).input_ids
        assert torch.equal(stand_in[circle], rows.table[own].mean(0))


def test_t5_word_vocabulary_is_its_whole_word_pieces():
    tokenizer = build_random_flux_pipeline(small=True).tokenizer_2
    words = word_vocabulary(tokenizer)
    names = tokenizer.convert_ids_to_tokens(words.tolist())
    assert "▁circle" in names and all(name.startswith("▁") and len(name) > 1 for name in names)
    assert not set(words.tolist()) & set(tokenizer.all_special_ids)
    ids = words[[3, 40, 7]].tolist()
    assert tokenizer(tokenizer.decode(ids), add_special_tokens=False).input_ids == ids


@pytest.mark.parametrize("family", FAMILIES)
def test_ring_a_bell_searches_the_context_the_denoiser_reads(family):
    module = erased(family).eval()  # as measure_attack runs attacks
    tokenizer = module.family.context_tokenizer
    candidates = ring_a_bell.vocabulary(tokenizer)
    ids = candidates[torch.tensor([[3, 40, 7], [5, 6, 8]])]
    with torch.no_grad():
        assert torch.equal(encode_ids(module, ids), module.encode(tokenizer.batch_decode(ids), cache=False).embeds)
    ring_a_bell.FOUND.clear()
    result = measure_attack("ring_a_bell", Target(module, ROWS, FAST, 1, Parity()), BUDGET)
    assert len(result.losses) == 2 and result.fields["random_control_judged_images"] == 2
    for prompt in result.fields["found_prompts"]:
        found = tokenizer(prompt, add_special_tokens=False).input_ids
        assert found and set(found) <= set(candidates.tolist())


def test_relearn_tunes_flux_text_stream_keys_and_values_without_trained_tensors():
    module = Instruction(build_random_flux_pipeline(small=True), InstructionConfig(), ["circle"], resolution=64)
    parameters, which = relearned_parameters(module)
    assert parameters and all("attn.add_k_proj" in name or "attn.add_v_proj" in name for name in parameters)
    assert which.startswith("attn.add_k_proj/add_v_proj")


def test_the_frozen_t5_encodes_without_dropout_in_training_mode():
    """FLUX's T5 has dropout; the module keeps it in eval mode while it trains (EraserModule.train), so
    an attack on a module in training mode (as Trainer.fit leaves it) sees one encoding per prompt."""
    module = erased("flux").train()
    assert module.training and not module.text_encoder_2.training
    prompts = [ROWS[0].prompt]
    assert torch.equal(module.encode(prompts, cache=False).embeds, module.encode(prompts, cache=False).embeds)


def test_sd_keeps_its_path(monkeypatch):
    """SD-1.x/2.x as before: one text encoder, CLIP's whole words, a bare context in the conditioning,
    the module's mode untouched by measure_attack (the toy world's published numbers repeat)."""
    pipeline = load_pipeline(TOYWORLD_MODEL)
    module = UCE(pipeline, UCEConfig(), ["circle"]).train()
    tokenizer = module.family.context_tokenizer
    assert tokenizer is pipeline.tokenizer and len(text_encoders(pipeline)) == 1
    assert all(name.endswith("</w>") for name in tokenizer.convert_ids_to_tokens(word_vocabulary(tokenizer).tolist()))
    free = FreeEmbeddings(module, ["a red circle"], ["circle"], "concept+end")
    condition = free.embeds([0])
    assert torch.equal(condition.embeds, module.encode(["a red circle"]).embeds)
    assert (condition.pooled, condition.time_ids, condition.guidance) == (None, None, None)
    seen = []

    def spy(target, config):
        seen.append(target.module.training)
        return AttackResult(torch.zeros(0), [""], [], {"attack_success_rate": 0.0, "attack_success_rate_ci95": [0, 1]})

    monkeypatch.setitem(ATTACKS, "spy", spy)
    measure_attack("spy", Target(module, ROWS, FAST, 1, Parity()), AttackConfig())
    assert seen == [True]

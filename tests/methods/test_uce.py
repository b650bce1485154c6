import numpy as np
import pytest
import torch

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.methods.uce import SHARED, UCE, UCEConfig, edit_weight, uce_transform


def stacked_least_squares(w_old, erase, guide, preserve, lam, s_e, s_p):
    """argmin_W lam||W - W_old||^2 + s_e sum ||W c_i - W_old g_i||^2 + s_p sum ||W c_j - W_old c_j||^2 by lstsq."""
    d = w_old.shape[1]
    a = np.vstack([np.sqrt(lam) * np.eye(d), np.sqrt(s_e) * erase, np.sqrt(s_p) * preserve])
    b = np.vstack([np.sqrt(lam) * w_old.T, np.sqrt(s_e) * guide @ w_old.T, np.sqrt(s_p) * preserve @ w_old.T])
    solution, *_ = np.linalg.lstsq(a, b, rcond=None)
    return solution.T


@pytest.mark.parametrize("lam, s_e, s_p", [(0.5, 1.0, 1.0), (0.1, 3.0, 0.2), (2.0, 1.0, 0.0)])
def test_closed_form_equals_least_squares(lam, s_e, s_p):
    rng = np.random.default_rng(0)
    w_old = rng.normal(size=(12, 8))
    erase, guide, preserve = rng.normal(size=(3, 8)), rng.normal(size=(3, 8)), rng.normal(size=(5, 8))
    transform = uce_transform(*(torch.from_numpy(x) for x in (erase, guide, preserve)), lam, s_e, s_p)
    closed = (torch.from_numpy(w_old) @ transform).numpy()
    expected = stacked_least_squares(w_old, erase, guide, preserve, lam, s_e, s_p)
    assert np.linalg.norm(closed - expected) / np.linalg.norm(expected) < 1e-6


def test_without_erase_concepts_the_weights_do_not_change():
    rng = np.random.default_rng(1)
    w_old = torch.from_numpy(rng.normal(size=(6, 4))).float()
    empty = torch.zeros(0, 4)
    transform = uce_transform(empty, empty, torch.randn(3, 4), 0.5, 1.0, 1.0)
    assert torch.allclose(transform, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(edit_weight(w_old, transform), w_old, atol=1e-7)


@pytest.fixture(scope="module")
def edited():
    module = UCE(load_pipeline(TOYWORLD_MODEL), UCEConfig(prompt_template="a {concept}", preserve=["square", "star"]),
                 ["circle"])
    module.log_dict = lambda *args, **kwargs: None
    module.trainer = type("Trainer", (), {"should_stop": False})()
    module.training_step(0, 0)
    return module


def test_edit_maps_the_concept_key_onto_the_guide_and_keeps_preserved_keys(edited):
    erase, guide, preserve = edited.edit_keys()[SHARED]
    for name, weight in edited.trained.items():
        old = edited.original[name]
        before = (old @ erase.T - old @ guide.T).norm()
        after = (weight @ erase.T - old @ guide.T).norm()
        assert after < 0.5 * before, name
        assert (weight @ preserve.T - old @ preserve.T).norm() < 0.1 * (old @ preserve.T).norm(), name


def test_only_cross_attention_keys_and_values_are_edited(edited):
    assert edited.trained and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in edited.trained)
    assert set(edited.changed_tensors()) == set(edited.trained)


def test_token_modes_select_the_last_word_or_more():
    pipeline = load_pipeline(TOYWORLD_MODEL)
    counts = {}
    for mode in ("last", "last+eot", "all"):
        module = UCE(pipeline, UCEConfig(token_mode=mode), ["circle"])
        counts[mode] = len(module.keys(["a circle"])[SHARED][0])
    tokens = pipeline.tokenizer.model_max_length
    assert counts == {"last": 1, "last+eot": tokens - 2, "all": tokens}


def test_last_token_keys_from_the_short_batch_equal_the_full_context_encoding():
    """The encoder is causal: encoding only up to the last word gives the same embeddings."""
    module = UCE(load_pipeline(TOYWORLD_MODEL), UCEConfig(token_mode="last"), ["circle"])
    prompts = ["a circle", "a red striped circle", "heart", "a picture of a dotted purple star"]
    full = module.encode(prompts).embeds
    for prompt, key, embed in zip(prompts, module.keys(prompts)[SHARED], full):
        last = len(module.pipeline.tokenizer(prompt).input_ids) - 2
        assert key.shape == (1, embed.shape[-1])
        assert torch.allclose(key[0], embed[last], atol=1e-5), prompt


def test_the_float64_solution_is_applied_to_float32_weights_precisely():
    torch.manual_seed(0)
    weight = torch.randn(64, 32)
    transform = torch.eye(32, dtype=torch.float64) + 0.01 * torch.randn(32, 32, dtype=torch.float64)
    exact = weight.double() @ transform
    assert edit_weight(weight, transform).dtype == torch.float32
    assert (edit_weight(weight, transform).double() - exact).norm() / exact.norm() < 1e-6


@pytest.fixture(scope="module")
def flux_pipeline():
    """FLUX.1-dev with small random weights and a 16-token T5 context."""
    from erasure.toyworld.real_architectures import build_random_flux_pipeline

    pipeline = build_random_flux_pipeline(small=True)
    pipeline.tokenizer_2.model_max_length = 16
    return pipeline


def authors_keys(pipeline, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 state at attention-mask length - 2, pooled CLIP vector) as trainscripts/uce_flux_edit.py takes them."""
    t5, pooled, _ = pipeline.encode_prompt(prompt, None, max_sequence_length=16)
    mask = pipeline.tokenizer_2(prompt, padding="max_length", max_length=16, truncation=True,
                                return_tensors="pt").attention_mask
    return t5[0, int(mask.sum()) - 2], pooled[0]


def test_flux_authors_edit_solves_uce_for_the_t5_and_pooled_keys(flux_pipeline):
    """UCE on FLUX (default flux_edit=authors) changes only the weights of context_embedder and
    text_embedder.linear_1, each the least-squares solution for its own keys: the last T5 token ("" its
    last padded position) and the pooled CLIP vector of the concept, mapped to the guide's outputs."""
    config = UCEConfig(prompt_template="a {concept}", guide=[""], preserve=["square", "star"], lam=0.5)
    module = UCE(flux_pipeline, config, ["circle"], resolution=64)
    module.edit()
    changed = set(module.changed_tensors())
    assert changed == {"context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"}
    keys = {prompt: authors_keys(flux_pipeline, prompt) for prompt in ("a circle", "", "a square", "a star")}
    for index, name in enumerate(["context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"]):
        erase, guide = keys["a circle"][index][None], keys[""][index][None]
        preserve = torch.stack([keys["a square"][index], keys["a star"][index]])
        old = module.original[name].double()
        expected = stacked_least_squares(old.numpy(), *(k.double().numpy() for k in (erase, guide, preserve)),
                                         0.5, 1.0, 1.0)
        weight = module.trained[name].detach().double().numpy()
        assert np.linalg.norm(weight - expected) / np.linalg.norm(expected - old.numpy()) < 1e-3, name
    for name in module.original:
        module.trained[name].data.copy_(module.original[name])


def test_flux_per_block_edit_is_an_option_and_edit_v_needs_it(flux_pipeline):
    module = UCE(flux_pipeline, UCEConfig(flux_edit="per-block"), ["circle"], resolution=64)
    assert module.trained and all(n.endswith(("attn.add_k_proj.weight", "attn.add_k_proj.bias", "attn.add_v_proj.weight",
                                              "attn.add_v_proj.bias")) for n in module.trained)
    with pytest.raises(ValueError, match="use method.flux_edit=per-block"):
        UCE(flux_pipeline, UCEConfig(edit="v"), ["circle"], resolution=64)

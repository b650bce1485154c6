"""MACE: its token pairing, both closed forms against least squares, the attention loss, and an erasure on the
toy world."""

import pytest
import torch

from erasure.methods.mace import MACE, AttentionSuppression, MACEConfig, paired_positions, timestep_weights

TOY_TEMPLATES = ["{}", "a picture of {}"]
SHAPES = ["square", "triangle", "star", "heart", "cross"]


def mace(pipeline, **options):
    config = MACEConfig(**{"prompt_template": "a {concept}", "guide": ["a square"], "preserve": SHAPES,
                           "templates": TOY_TEMPLATES, "data": "renderer", **options})
    module = MACE(pipeline, config, ["circle"])
    module.pairs = module.prompt_pairs()
    return module


def restore(module):
    with torch.no_grad():
        for name, parameter in module.trained.items():
            parameter.copy_(module.original[name])


def test_the_tokens_are_paired_by_common_prefix_and_suffix_and_the_padding_after_them():
    # [BOS, a, photo, of, ship, EOS] against [BOS, a, photo, of, a, person, EOS], context length 10
    old, new = [0, 5, 6, 7, 8, 1], [0, 5, 6, 7, 5, 9, 1]
    old_positions, new_positions = paired_positions(old, new, 10)
    assert old_positions == [0, 1, 2, 3, 5, 6, 7, 8]  # "ship" left out; EOS, then padding up to the shorter end
    assert new_positions == [0, 1, 2, 3, 6, 7, 8, 9]
    assert paired_positions([0, 5, 1], [0, 5, 1], 4) == ([0, 1, 2, 3], [0, 1, 2, 3])  # the same prompt: every token


def test_the_timestep_weights_concentrate_between_200_and_400():
    weights = timestep_weights(1000)
    assert abs(float(weights.sum()) - 1) < 1e-12
    assert float(weights[200:400].sum()) > 0.8 and int(weights.argmax()) in range(290, 311)


def test_the_refinement_is_the_least_squares_solution(toy_pipeline):
    """W_1 minimises lambda ||W - W_o||^2 + sum ||W e_o - W_o e_n||^2 + s_1 sum_p ||W e_p - W_o e_p||^2, here
    solved as one stacked least-squares problem per projection."""
    module = mace(toy_pipeline, lamb=0.3, train_preserve_scale=0.5, preserve_weight=2.0)
    try:
        module.refine()
        mixed, keys = module.refinement_keys()
        pairs = []
        tokenizer = toy_pipeline.tokenizer
        for old, new in module.pairs:
            old_states, new_states = module.states(old), module.states(new)
            for i, (o, n) in enumerate(zip(tokenizer(old).input_ids, tokenizer(new).input_ids)):
                a, b = paired_positions(o, n, old_states.shape[1])
                pairs.append((old_states[i, a], new_states[i, b]))
        e_o = torch.cat([a for a, _ in pairs])
        e_n = torch.cat([b for _, b in pairs])
        kept = [t.format(f"a {s}") for s in SHAPES for t in TOY_TEMPLATES]
        e_p = module.states(kept).flatten(0, 1)
        s_1 = 0.5 ** 2 * 2.0
        width = e_o.shape[1]
        for name in [n for n in module.trained if n.endswith("to_k.weight")][:2]:
            w_o = module.original[name].double()
            design = torch.cat([0.3 ** 0.5 * torch.eye(width, dtype=torch.float64), e_o, s_1 ** 0.5 * e_p])
            goal = torch.cat([0.3 ** 0.5 * w_o.T, e_n @ w_o.T, s_1 ** 0.5 * e_p @ w_o.T])
            expected = torch.linalg.lstsq(design, goal).solution.T
            assert torch.allclose(module.trained[name].double(), expected, atol=1e-4 * float(expected.abs().max()))
    finally:
        restore(module)


def test_the_fusion_is_the_least_squares_solution(toy_pipeline):
    """W* minimises lambda ||W - W_1||^2 + sum_i sum_e ||W e - (W_1 + B_i A_i) e||^2 + s_f sum_p ||W e_p - W_o e_p||^2."""
    module = mace(toy_pipeline, lamb=0.2, fuse_preserve_scale=0.5, preserve_weight=2.0)
    try:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in module.loras.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        refined = {name: p.detach().double().clone() for name, p in module.trained.items()}
        module.fuse()
        e = module.states(module.pairs[0][0]).flatten(0, 1)
        kept = [t.format(f"a {s}") for s in SHAPES for t in TOY_TEMPLATES]
        e_p = module.states(kept).flatten(0, 1)
        width = e.shape[1]
        for name in [n for n in module.trained if n.endswith("to_v.weight")][:2]:
            w_i = refined[name] + module.loras[0].delta(name).detach().double()
            design = torch.cat([0.2 ** 0.5 * torch.eye(width, dtype=torch.float64), e, 1.0 ** 0.5 * e_p])
            goal = torch.cat([0.2 ** 0.5 * refined[name].T, e @ w_i.T, e_p @ module.original[name].double().T])
            expected = torch.linalg.lstsq(design, goal).solution.T
            assert torch.allclose(module.trained[name].double(), expected, atol=1e-4 * float(expected.abs().max()))
    finally:
        restore(module)


def test_the_attention_loss_leaves_the_unet_output_and_sums_the_masked_attention_norms(toy_pipeline):
    module = mace(toy_pipeline)
    unet = toy_pipeline.unet
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 16, 16)
    condition = module.encode_frozen(["a picture of a circle"]).embeds
    t = torch.tensor([300])
    positions = module.positions("circle", ["a picture of a circle"])[0]
    assert positions.sum() == 1 + (32 - 6)  # "circle" and the end token (position 6) with all the padding after it
    processors = {name: type(p) for name, p in unet.attn_processors.items()}
    with torch.no_grad():
        plain = unet(latents, t, condition).sample
        mask = torch.zeros(1, 1, 32, 32)
        mask[..., 8:24, 8:24] = 1
        with AttentionSuppression(unet, positions, mask) as attention:
            suppressed = unet(latents, t, condition).sample
        with AttentionSuppression(unet, positions, torch.zeros(1, 1, 32, 32)) as empty:
            unet(latents, t, condition)
    assert torch.allclose(plain, suppressed, atol=1e-5)
    assert float(attention.loss) > 0 and float(empty.loss) == 0
    assert {name: type(p) for name, p in unet.attn_processors.items()} == processors  # the processors are back


def test_training_a_concepts_lora_takes_attention_off_its_object(toy_pipeline):
    module = mace(toy_pipeline, lr=1e-2)
    try:
        module.concept_at = lambda step: 0
        module.on_fit_start()
        optimizer = module.configure_optimizers()

        def loss(seeds):
            total = 0.0
            for seed in seeds:
                module.step_generator = lambda seed=seed: torch.Generator().manual_seed(seed)
                with torch.no_grad():
                    total += float(module.objective())
            return total / len(seeds)

        before = loss(range(1000, 1016))
        for step in range(30):
            module.step_generator = lambda step=step: torch.Generator().manual_seed(step)
            module.objective().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert loss(range(1000, 1016)) < 0.8 * before
    finally:
        restore(module)


def test_without_images_mace_names_the_fix():
    with pytest.raises(ValueError, match="method.data=<folder>.*Grounded-SAM"):
        MACE.check(MACEConfig(), ["ship"])


def test_the_budget_is_the_authors_steps_per_concept_and_the_preserve_weight_their_configs():
    assert MACE.kind_defaults(None, ["a"] * 10) == {"method": {"preserve_weight": 8e4}, "trainer": {"max_steps": 500}}
    assert MACE.kind_defaults(None, ["a"])["method"]["preserve_weight"] == 8e3
    assert MACE.kind_defaults("nudity", ["nudity"])["trainer"]["max_steps"] == 120
    assert MACE.kind_defaults("style", ["x"] * 3)["method"]["masks"] is False


def test_a_run_erases_two_shapes_on_the_toy_model_and_keeps_the_others(tmp_path):
    from erasure.bundle import TOYWORLD_CLASSIFIER, TOYWORLD_MODEL, load_pipeline
    from erasure.train import main
    from erasure.generation import Sampler
    from erasure.weights import DELTA_FILE, load_delta
    from evaluation.protocols.toyworld import ToyWorldEvaluator, ToyWorldEvaluatorConfig

    output = tmp_path / "run"
    assert main(["recipe=mace", "concept=[circle,star]", "evaluation.enabled=false", f"output_dir={output}"]) == 0
    delta = load_delta(output / "erased" / DELTA_FILE)
    assert delta and all(name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for name in delta)
    module = MACE(load_pipeline(TOYWORLD_MODEL), MACEConfig(data="renderer"), ["circle", "star"])
    module.load_erased(output / "erased")
    judge = ToyWorldEvaluator(ToyWorldEvaluatorConfig(str(TOYWORLD_CLASSIFIER)))
    colours = ["red", "blue", "green", "yellow"]
    erased = module.generate([f"a {c} {s}" for s in ("circle", "star") for c in colours], list(range(8)), Sampler(steps=10))
    kept = ["square", "triangle", "heart", "cross"]
    others = module.generate([f"a {c} {s}" for s in kept for c in colours[:2]], list(range(8)), Sampler(steps=10))
    assert int(judge.sees(erased, ["circle"] * 4 + ["star"] * 4).sum()) <= 1
    assert int(judge.sees(others, [s for s in kept for _ in colours[:2]]).sum()) >= 7

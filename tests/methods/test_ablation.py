import json
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.generation import Sampler
from erasure.methods.ablation import (
    ANCHORS_FILE,
    ANCHORS_SOURCE,
    TARGET_TEMPLATE_SETS,
    Ablation,
    AblationConfig,
    Anchors,
    ablation_loss,
    check_anchor,
    start_token_detached,
    target_prompt,
    templates_of,
)
from erasure.toyworld.captions import prompts_naming
from erasure.train import main

SQUARES = prompts_naming("square")


def test_target_prompt_names_the_erased_concept_with_the_right_article():
    assert target_prompt("a red square", "square", "circle") == "a red circle"
    assert target_prompt("a square", "square", "circle") == "a circle"
    assert target_prompt("a red square", "red", "orange") == "an orange square"
    assert target_prompt("an orange star", "orange", "red") == "a red star"
    assert target_prompt("a striped square", "square", "outline", {"outline": "outlined"}) == "a striped outlined"
    assert target_prompt("a painting of the sea", "painting", "Monet",
                         template="{anchor_prompt} in the style of {concept}") == "a painting of the sea in the style of Monet"


def test_model_based_step_moves_only_cross_attention_keys_and_values(tmp_path):
    module = Ablation(load_pipeline(TOYWORLD_MODEL), AblationConfig(anchor="square", anchor_prompts=SQUARES, num_anchor_images=4,
                                                                 anchor_steps=4, lr=1e-3),
                      ["circle"])
    anchors = Anchors.load_or_generate(module, module.config, tmp_path / "anchors.safetensors")
    assert anchors.latents.shape == (4, 4, 16, 16) and (tmp_path / "anchors.safetensors").exists()
    cached = Anchors.load_or_generate(module, module.config, tmp_path / "anchors.safetensors")
    assert torch.equal(cached.latents, anchors.latents)  # generated once, then read back

    before = {n: p.detach().clone() for n, p in module.denoiser.named_parameters()}
    optimizer = module.configure_optimizers()
    loss = ablation_loss(module, module.config, anchors)
    loss.backward()
    optimizer.step()
    changed = {n for n, p in module.denoiser.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert torch.isfinite(loss) and changed and changed <= set(module.trained)
    assert all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in changed)


def test_the_frozen_anchor_target_is_the_original_models_prediction(tmp_path):
    module = Ablation(load_pipeline(TOYWORLD_MODEL), AblationConfig(anchor="square", anchor_prompts=SQUARES,
                                                                 num_anchor_images=2, anchor_steps=2), ["circle"])
    x_t, t, embeds = torch.randn(2, 4, 16, 16), torch.tensor([300, 600]), module.encode(["a square", "a red square"])
    with torch.no_grad():
        expected = module.predict(x_t, t, embeds)
        for parameter in module.trained.values():
            parameter.mul_(1.5)
        assert torch.allclose(module.predict_frozen(x_t, t, embeds), expected, atol=1e-5)


def test_target_prompt_substitutes_the_whole_word_in_any_case_and_fits_only_its_own_article():
    assert target_prompt("A Red Square", "square", "circle") == "A Red Circle"
    assert target_prompt("an hour with a square", "square", "circle") == "an hour with a circle"
    assert target_prompt("a square", "square", "octagon") == "an octagon"
    assert target_prompt("A square", "square", "octagon") == "An octagon"
    assert target_prompt("two squares and a square", "square", "circle") == "two squares and a circle"
    assert target_prompt("a person wearing clothes on a beach", "person wearing clothes", "nudity",
                         {"nudity": "nude person"}) == "a nude person on a beach"


def test_target_template_sets_are_the_references_style_templates():
    assert TARGET_TEMPLATE_SETS["style-diffusers"][0].format(anchor_prompt="a painting of a house", concept="Monet") \
        == "a painting of a house, in the style of Monet"
    config = AblationConfig(anchor="painting", anchor_prompts=["a painting"], target_template="style-diffusers")
    assert templates_of(config) == TARGET_TEMPLATE_SETS["style-diffusers"]
    assert templates_of(AblationConfig(target_template="{anchor_prompt} by {concept}")) == ("{anchor_prompt} by {concept}",)
    assert templates_of(AblationConfig()) == (None,)


@pytest.mark.parametrize("options, message", [
    ({"anchor": "circle"}, "method.anchor 'circle' is the erased concept itself"),
    ({"anchor": "square", "anchor_prompts": ["a star", "a red star"]}, "every target prompt equals its anchor prompt"),
    ({"anchor": "square", "words": {"circle": "square"}}, "every target prompt equals its anchor prompt"),
    ({"anchor": "square", "target_template": "{anchor_prompt}, framed"}, "does not name {concept}"),
    ({"anchor": ""}, "method.anchor is empty"),
])
def test_anchors_that_cannot_be_ablated_towards_are_one_line_errors(options, message):
    config = AblationConfig(**{"anchor_prompts": SQUARES, **options})
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        check_anchor(config, ["circle"])
    assert "\n" not in str(error.value)
    check_anchor(AblationConfig(anchor="square", anchor_prompts=SQUARES), ["circle"])


@pytest.mark.parametrize("arguments, message", [
    (["recipe=ablation", "method.anchor=red"],
     "method.anchor 'red' is a color but concept 'circle' is a shape; set method.anchor to another shape"),
    (["recipe=ablation", "method.adapter=lora", "method.anchor=striped"], "method.anchor 'striped' is a style"),
    (["recipe=ablation", "method.anchor=circle"], "method.anchor 'circle' is the erased concept itself"),
])
def test_a_toy_world_anchor_of_another_kind_or_the_concept_itself_is_refused(tmp_path, capsys, arguments, message):
    output = tmp_path / "run"
    assert main([*arguments, f"output_dir={output}", "evaluation.enabled=false"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not output.exists()


def ablation(**options) -> Ablation:
    config = AblationConfig(**{"anchor": "square", "anchor_prompts": SQUARES, "num_anchor_images": 2, "anchor_steps": 2,
                               "batch_size": 2, **options})
    return Ablation(load_pipeline(TOYWORLD_MODEL), config, ["circle"])


def test_detaching_the_start_token_removes_exactly_its_key_and_value_gradient():
    module = ablation()
    x_t, t, embeds = torch.randn(2, 4, 16, 16), torch.tensor([300, 600]), module.encode(["a red circle", "a square"])
    projections = {n: m for n, m in module.denoiser.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}
    seen = {}

    def record(name):
        def hook(_, inputs, output):
            output.retain_grad()
            seen[name] = (inputs[0].detach(), output)
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in projections.items()]
    prediction = module.predict(x_t, t, embeds)
    prediction.square().mean().backward()
    for handle in handles:
        handle.remove()
    full = {n: p.grad.clone() for n, p in module.trained.items()}
    module.zero_grad()
    with start_token_detached(module.denoiser):
        detached = module.predict(x_t, t, embeds)
    detached.square().mean().backward()
    assert torch.equal(detached, prediction)  # the forward values are unchanged
    assert set(seen) == {n.removesuffix(".weight") for n in module.trained}
    for name, (hidden, output) in seen.items():
        through_start_token = torch.einsum("bo,bi->oi", output.grad[:, 0], hidden[:, 0])
        gradient, expected = module.trained[f"{name}.weight"].grad, full[f"{name}.weight"] - through_start_token
        scale = full[f"{name}.weight"].abs().max()
        assert torch.allclose(gradient, expected, rtol=1e-4, atol=1e-5 * scale), name
        assert not torch.allclose(gradient, full[f"{name}.weight"], rtol=1e-4, atol=1e-5 * scale), name
    assert all(not m._forward_hooks for m in projections.values())  # the hooks are gone after the block

    anchors = Anchors(torch.randn(2, 4, 16, 16), SQUARES[:2])
    gradients, losses = {}, {}
    for detach in (True, False):
        module.zero_grad()
        module.config.detach_start_token = detach
        losses[detach] = ablation_loss(module, module.config, anchors)
        losses[detach].backward()
        gradients[detach] = torch.cat([p.grad.flatten() for p in module.trained.values()])
    assert torch.equal(losses[True], losses[False]) and not torch.allclose(gradients[True], gradients[False])


def test_the_prior_term_draws_its_own_anchor_batch_and_scales_linearly():
    module = ablation()
    anchors = Anchors(torch.randn(4, 4, 16, 16), SQUARES[:4])
    with torch.no_grad():
        losses = {}
        for weight in (0.0, 0.2, 1.0):
            module.config.prior_weight = weight
            losses[weight] = ablation_loss(module, module.config, anchors)
        prior = losses[1.0] - losses[0.0]
        assert torch.allclose(losses[0.2] - losses[0.0], 0.2 * prior, rtol=1e-4)

        generator = module.step_generator()  # the ablation half-batch's draws, then the prior half-batch's
        picks = torch.randint(4, (2,), generator=generator).tolist()
        torch.randint(1, (2,), generator=generator)  # the erased concept of each sample
        x_t, noise, t = module.add_noise(anchors.latents[picks], generator)
        shared = module.loss(module.predict(x_t, t, module.encode([anchors.prompts[i] for i in picks])), noise)
        prior_picks = torch.randint(4, (2,), generator=generator).tolist()
        prior_x_t, prior_noise, prior_t = module.add_noise(anchors.latents[prior_picks], generator)
        own = module.loss(module.predict(prior_x_t, prior_t, module.encode([anchors.prompts[i] for i in prior_picks])),
                          prior_noise)
    assert torch.allclose(prior, own, rtol=1e-4) and not torch.allclose(prior, shared, rtol=1e-2)


def test_the_optimizer_is_the_references_adamw_with_clipping_and_optional_lr_scaling():
    module = ablation(lr=2e-6, batch_size=8)
    optimizer = module.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["weight_decay"] == 1e-2
    assert optimizer.param_groups[0]["lr"] == 2e-6 and module.gradient_clip_val() == 1.0
    module.config.scale_lr = True
    assert module.configure_optimizers().param_groups[0]["lr"] == pytest.approx(2e-6 * 8)
    module.config.prior_weight = 0.2  # the prior half-batch doubles the samples per step
    assert module.configure_optimizers().param_groups[0]["lr"] == pytest.approx(2e-6 * 16)
    module._trainer = SimpleNamespace(world_size=2)  # two devices
    assert module.configure_optimizers().param_groups[0]["lr"] == pytest.approx(2e-6 * 32)
    module._trainer = None
    module.config.optimizer, module.config.max_grad_norm = "adam", None
    assert type(module.configure_optimizers()) is torch.optim.Adam and module.gradient_clip_val() is None


def test_anchor_images_take_the_concept_as_negative_prompt_and_the_cache_is_keyed_by_its_prompts(tmp_path, monkeypatch):
    module = ablation()
    cache = tmp_path / ANCHORS_FILE
    negatives_seen = []
    generate = module.generate

    def recording_generate(*args, **kwargs):
        negatives_seen.append(kwargs.get("negative_prompts"))
        return generate(*args, **kwargs)

    monkeypatch.setattr(module, "generate", recording_generate)
    plain = Anchors.load_or_generate(module, module.config, cache)
    assert torch.equal(Anchors.load_or_generate(module, module.config, cache).latents, plain.latents)
    assert negatives_seen == [None]  # generated once, then read back

    module.config.anchor_negative_prompt = True
    negative = Anchors.load_or_generate(module, module.config, cache)
    assert negatives_seen[-1] == ["circle", "circle"] and not torch.equal(negative.latents, plain.latents)

    module.config.anchor_prompts = SQUARES[2:4]  # a resume with other anchor prompts regenerates
    other = Anchors.load_or_generate(module, module.config, cache)
    assert len(negatives_seen) == 3 and other.prompts == SQUARES[2:4]
    with safe_open(cache, framework="pt") as stored:
        source = json.loads(stored.metadata()[ANCHORS_SOURCE])
    assert source["prompts"] == SQUARES[2:4] and source["negative_prompts"] == ["circle", "circle"]
    with pytest.raises(ValueError, match="negative_prompts are for the original model"):
        generate(["a square"], [0], Sampler(steps=2), negative_prompts=["circle"])


def test_anchor_images_are_sampled_with_the_configured_ddim_eta_and_the_cache_is_keyed_by_it(tmp_path, monkeypatch):
    module = ablation(anchor_eta=1.0)
    cache = tmp_path / ANCHORS_FILE
    samplers = []
    generate = module.generate

    def recording_generate(prompts, seeds, sampler, **kwargs):
        samplers.append(sampler)
        return generate(prompts, seeds, sampler, **kwargs)

    monkeypatch.setattr(module, "generate", recording_generate)
    stochastic = Anchors.load_or_generate(module, module.config, cache)
    assert samplers == [Sampler(steps=2, guidance=6.0, eta=1.0)]
    module.config.anchor_eta = 0.0  # another eta regenerates: DDIM's noise term changes the images
    deterministic = Anchors.load_or_generate(module, module.config, cache)
    assert samplers[-1].eta == 0.0 and not torch.equal(stochastic.latents, deterministic.latents)
    with safe_open(cache, framework="pt") as stored:
        assert json.loads(stored.metadata()[ANCHORS_SOURCE])["eta"] == 0.0

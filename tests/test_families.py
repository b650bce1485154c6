"""erasure.families on small random-weight SDXL and FLUX.1-dev pipelines (the real classes and layer
names; widths shrunk): the conditioning, FLUX's flow-matching process, the methods' samplers against
the pipelines' own loops, and every method that transfers, one step each, with its result loading back."""

import json

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionXLPipeline

from erasure.toyworld.real_architectures import build_random_flux_pipeline, build_random_sdxl_pipeline
from erasure.families import FLUX_DEFAULT_GUIDANCE, Conditioning, Flux, StableDiffusionXL
from erasure.generation import Sampler, generate
from erasure.methods.ablation import Ablation, AblationConfig, Anchors, ablation_loss
from erasure.methods.esd import ESD, ESDConfig, esd_loss
from erasure.methods.instruction import Instruction, InstructionConfig
from erasure.methods.uce import SHARED, UCE, UCEConfig
from erasure.train import main as train

RESOLUTION = 64
BUILDERS = {"sdxl": lambda: build_random_sdxl_pipeline(sample_size=8, small=True),
            "flux": lambda: short_context(build_random_flux_pipeline(small=True))}


def short_context(pipeline: FluxPipeline) -> FluxPipeline:
    """FLUX with a 16-token T5 context (the real 512 tokens only slow these tests down)."""
    pipeline.tokenizer_2.model_max_length = 16
    return pipeline


@pytest.fixture(params=list(BUILDERS))
def family(request):
    return request.param


def test_conditioning_batches_every_tensor_together():
    condition = Conditioning(torch.arange(12.0).view(3, 2, 2), pooled=torch.arange(3.0).view(3, 1))
    assert torch.equal(Conditioning.cat([condition[:1], condition[1:]]).embeds, condition.embeds)
    twice = condition.repeat(2)
    assert len(twice) == 6 and torch.equal(twice.pooled[3:], condition.pooled) and twice.time_ids is None


def test_flux_noise_and_velocity_target_are_one_straight_path():
    family = Flux(BUILDERS["flux"](), RESOLUTION)
    x0, noise = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    t = torch.tensor([250.0, 1000.0])
    x_t, velocity = family.add_noise(x0, noise, t), family.target(x0, noise, t)
    assert torch.allclose(x_t[1], noise[1])  # t = 1000: pure noise
    assert torch.allclose(x_t - (t / 1000).view(-1, 1, 1, 1) * velocity, x0, atol=1e-6)  # one Euler step to t = 0
    assert torch.allclose(x_t + (1 - t / 1000).view(-1, 1, 1, 1) * velocity, noise, atol=1e-6)


def test_sdxl_conditioning_is_the_pipelines():
    pipeline = BUILDERS["sdxl"]()
    family = StableDiffusionXL(pipeline, RESOLUTION)
    condition = family.encode(["a red circle", ""], torch.device("cpu"))
    embeds, _, pooled, _ = pipeline.encode_prompt(["a red circle"], do_classifier_free_guidance=False)
    assert torch.allclose(condition.embeds[:1], embeds, atol=1e-6) and torch.allclose(condition.pooled[:1], pooled, atol=1e-6)
    assert condition.embeds.shape[-1] == pipeline.unet.config.cross_attention_dim  # both encoders, concatenated
    assert not condition.embeds[1].any() and not condition.pooled[1].any()  # "" is zero (force_zeros_for_empty_prompt)
    assert condition.time_ids.tolist() == [[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]] * 2


def test_flux_dev_conditions_every_prompt_at_one_guidance_embedding():
    condition = Flux(BUILDERS["flux"](), RESOLUTION).encode(["a circle", ""], torch.device("cpu"))
    assert condition.guidance.tolist() == [FLUX_DEFAULT_GUIDANCE] * 2  # the empty prompt's too
    assert condition.embeds.shape[1] == 16 and condition.pooled.shape == (2, 32)


@pytest.mark.parametrize("steps_taken", [1, 3])
def test_partial_sampling_follows_the_pipelines_own_loop(family, steps_taken):
    """x_t of the methods (``sample_until``) is the pipeline call's latent after the same steps: same
    noise, encoding, guidance (SDXL: DDIM + CFG; FLUX.1-dev: Euler at the guidance embedding) and schedule."""
    pipeline = BUILDERS[family]()
    module = ESD(pipeline, ESDConfig(), ["circle"], resolution=RESOLUTION)
    seen = {}

    def keep(pipe, step, timestep, tensors):
        seen[step] = tensors["latents"]
        return tensors

    arguments = module.family.call_arguments(Sampler(steps=4, guidance=3.0), None, 1)
    pipeline(["a red circle"], **arguments, height=RESOLUTION, width=RESOLUTION, output_type="latent",
             generator=torch.Generator().manual_seed(5), callback_on_step_end=keep)
    latents, _ = module.sample_until(module.encode(["a red circle"]), steps_taken, 4, 3.0,
                                     torch.Generator().manual_seed(5), frozen=True)
    expected = seen[steps_taken - 1]
    if family == "flux":
        expected = FluxPipeline._unpack_latents(expected, RESOLUTION, RESOLUTION, pipeline.vae_scale_factor)
    assert torch.allclose(latents, expected, atol=1e-5)


def test_esd_parameter_sets_map_onto_each_family(family):
    pipeline = BUILDERS[family]()
    trained = {method: set(ESD(pipeline, ESDConfig(train_method=method), ["circle"], resolution=RESOLUTION).trained)
               for method in ("esd-x", "esd-x-strict", "esd-u")}
    if family == "sdxl":
        assert all(".attn2." in n for n in trained["esd-x"]) and not any(".attn2." in n for n in trained["esd-u"])
    else:  # joint attention: every projection of both streams; strict: the text stream's keys and values
        assert any("add_k_proj" in n for n in trained["esd-x"]) and any("to_q" in n for n in trained["esd-x"])
        assert trained["esd-x-strict"] and all(".add_k_proj." in n or ".add_v_proj." in n
                                               for n in trained["esd-x-strict"])
        assert not any(".attn." in n for n in trained["esd-u"])
    assert trained["esd-x-strict"] < trained["esd-x"]


def one_step(module, loss_fn) -> None:
    """One optimiser step; the loss is finite, trained tensors moved and nothing else did."""
    before = {name: p.detach().clone() for name, p in module.denoiser.named_parameters()}
    optimizer = torch.optim.SGD(list(module.trained.values()), lr=1.0)
    loss = loss_fn()
    loss.backward()
    optimizer.step()
    moved = {name for name, p in module.denoiser.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert torch.isfinite(loss) and moved and moved <= set(module.trained)


@pytest.mark.parametrize("train_method", ["esd-x", "esd-x-strict", "esd-u"])
def test_esd_step(family, train_method):
    module = ESD(BUILDERS[family](), ESDConfig(train_method=train_method, ddim_steps=3, xt_bank=2,
                                               sample_from="frozen", batch_size=2), ["circle"], resolution=RESOLUTION)
    one_step(module, lambda: esd_loss(module, module.config))


def test_esd_window_timesteps_are_refused_on_flux():
    with pytest.raises(ValueError, match="query_timestep=ddim"):
        ESD(BUILDERS["flux"](), ESDConfig(query_timestep="window"), ["circle"], resolution=RESOLUTION)


def test_ablation_step(family, tmp_path):
    module = Ablation(BUILDERS[family](), AblationConfig(anchor="square", anchor_prompts=["a square"],
                                                         num_anchor_images=2, anchor_steps=2, batch_size=2),
                      ["circle"], resolution=RESOLUTION)
    anchors = Anchors.load_or_generate(module, module.config, tmp_path / "anchors.safetensors")
    assert anchors.latents.shape[1:] == (module.family.latent_channels, module.latent_size, module.latent_size)
    one_step(module, lambda: ablation_loss(module, module.config, anchors))


def test_uce_maps_the_concept_keys_onto_the_guide(family):
    module = UCE(BUILDERS[family](), UCEConfig(preserve=["square"], key_timesteps=2, flux_edit="per-block"), ["circle"],
                 resolution=RESOLUTION)
    module.edit()
    keys = module.edit_keys()
    if family == "sdxl":
        assert list(keys) == [SHARED] and keys[SHARED][0].shape[-1] == module.denoiser.config.cross_attention_dim
    else:  # one key space per double-stream block: the text stream entering its add_k_proj
        assert list(keys) == [f"transformer_blocks.{i}.attn" for i in range(len(module.denoiser.transformer_blocks))]
        assert keys[next(iter(keys))][0].shape == (2, module.denoiser.inner_dim)  # last token at 2 timesteps
    assert set(module.changed_tensors()) == {n for n in module.trained if n.endswith(".weight")}
    for name, weight in module.changed_tensors().items():
        erase, guide, preserve = keys[SHARED if family == "sdxl" else name.rsplit(".", 2)[0]]
        old = module.original[name]
        assert (weight @ erase.T - old @ guide.T).norm() < 0.5 * (old @ erase.T - old @ guide.T).norm(), name
        assert (weight @ preserve.T - old @ preserve.T).norm() < 0.5 * (old @ preserve.T).norm(), name


def test_instruction_rewrites_prompts_and_samples(family):
    module = Instruction(BUILDERS[family](), InstructionConfig(template="implicit"), ["circle"], resolution=RESOLUTION)
    prompts, negatives = module.prompts_for_generation(["a red circle", "a square"])
    assert prompts == ["a red circle, but without any circle", "a square"] and negatives is None
    images = module.generate(["a red circle", "a square"], [0, 1], Sampler(steps=2))
    assert images.shape == (2, RESOLUTION, RESOLUTION, 3)


def test_lora_eraser_loads_into_the_plain_pipeline_and_reproduces_its_images(family, tmp_path):
    """Trained a step, saved, and loaded with the family pipeline's own ``load_lora_weights``: the
    plain pipeline call gives the erased model's images exactly."""
    config = ESDConfig(adapter="lora", lora_targets="xattn", ddim_steps=2, xt_bank=2, sample_from="frozen", batch_size=2)
    module = ESD(BUILDERS[family](), config, ["circle"], resolution=RESOLUTION)
    one_step(module, lambda: esd_loss(module, module.config))
    path = module.save_erased(tmp_path)
    sampler, prompts, seeds = Sampler(steps=3, guidance=3.0), ["a circle", "a red square"], [0, 1]
    erased = module.generate(prompts, seeds, sampler)
    plain = BUILDERS[family]()
    assert isinstance(plain, (StableDiffusionXLPipeline, FluxPipeline))
    original = generate(plain, prompts, seeds, sampler, resolution=RESOLUTION)
    plain.load_lora_weights(path.parent)
    loaded = generate(plain, prompts, seeds, sampler, resolution=RESOLUTION)
    assert torch.equal(loaded, erased) and not torch.equal(loaded, original)
    fresh = ESD(BUILDERS[family](), module.config, ["circle"], resolution=RESOLUTION)
    fresh.load_erased(tmp_path)
    assert all(torch.equal(fresh.trained[n], p) for n, p in module.trained.items())


@pytest.mark.parametrize("family, recipe", [("sdxl", "esd"), ("flux", "lora")])
def test_a_run_from_the_command_line_trains_evaluates_and_saves(family, recipe, tmp_path):
    """``python -m erasure.train model=<folder>`` on a saved SDXL / FLUX folder: the toy world's protocol,
    evaluation before and after, the result in erased/."""
    folder = tmp_path / family
    BUILDERS[family]().save_pretrained(folder, safe_serialization=True)
    output = tmp_path / "run"
    assert train([f"recipe={recipe}", f"model={folder}", f"model.resolution={RESOLUTION}", "trainer.max_steps=2",
                  "method.ddim_steps=2", "method.xt_bank=2", "evaluation.steps=2", "evaluation.images_per_prompt=1",
                  f"output_dir={output}"]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert 0 <= metrics["after"]["efficacy/target_acc"] <= 1 and "efficacy/target_acc" in metrics["before"]
    assert any((output / "erased").iterdir()) and (output / "samples" / "target.png").is_file()
    assert metrics["protocol"]["sampler"].startswith({"sdxl": "DDIM", "flux": "Euler"}[family])
    if family == "flux":  # FLUX.1-dev's scheduler shifts its sigmas by the image's token count; the toy model's does not
        assert "shifted by the token count" in metrics["protocol"]["sampler"]


@pytest.mark.parametrize("method, families", [("advunlearn", ("sdxl", "flux")), ("sld", ("sdxl", "flux")),
                                              ("rece", ("flux",)), ("mace", ("sdxl", "flux"))])
def test_methods_that_do_not_transfer_say_so(method, families):
    from erasure.methods import METHODS

    cls = METHODS[method]
    for family in families:
        with pytest.raises(ValueError, match=f"{method} runs on .* not on {family.upper()}"):
            cls(BUILDERS[family](), cls.Config(), ["circle"], resolution=RESOLUTION)

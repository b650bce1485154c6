from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.methods.esd import (
    ESD, ESDConfig, banked_xt, compvis_steps, ddpm_window, esd_loss, esd_target,
)
from tests.methods import assert_bad_setting


def test_esd_target_is_the_papers_formula_with_eta():
    eps_concept, eps_null = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    for eta in (0.0, 1.0, 2.5):
        target = esd_target(eps_concept, eps_concept, eps_null, eta)
        assert torch.allclose(target, eps_null - eta * (eps_concept - eps_null), atol=1e-6)


def test_eta_one_is_the_diffusers_codes_eta_prime_two():
    """The later code writes eps_c - eta' (eps_c - eps_null) with eta' = 2: the same target as eta = 1."""
    eps_concept, eps_null = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    assert torch.allclose(esd_target(eps_concept, eps_concept, eps_null, 1.0),
                          eps_concept - 2.0 * (eps_concept - eps_null), atol=1e-6)


def test_erase_from_anchors_the_target_on_the_source_prompt():
    eps_from, eps_concept, eps_null = torch.randn(3, 1, 4, 4, 4)
    target = esd_target(eps_from, eps_concept, eps_null, 1.0)
    assert torch.allclose(target, eps_from - 2.0 * (eps_concept - eps_null), atol=1e-6)


def make(train_method="esd-x", **options):
    return ESD(load_pipeline(TOYWORLD_MODEL), ESDConfig(train_method=train_method, **options), ["circle"])


def test_parameter_selection_per_variant():
    names = {m: set(make(m).trained) for m in ("esd-x", "esd-x-strict", "esd-u", "esd-all")}
    assert names["esd-x"] and all(".attn2." in n for n in names["esd-x"])
    assert any(".attn2.to_q." in n for n in names["esd-x"]) and any(".attn2.to_out." in n for n in names["esd-x"])
    assert names["esd-x-strict"] and all(n.split(".attn2.")[1] in ("to_k.weight", "to_v.weight") for n in names["esd-x-strict"])
    assert names["esd-u"] and not any(".attn2." in n for n in names["esd-u"])
    assert {"conv_in.weight", "time_embedding.linear_1.weight"} <= names["esd-u"]
    assert names["esd-all"] == names["esd-x"] | names["esd-u"]
    assert not any("norm" in n for n in names["esd-all"])  # Linear and Conv2d only, as in the reference code


def test_frozen_prediction_is_the_original_model_after_training_changed_the_weights():
    module = make("esd-x")
    reference = UNet2DConditionModel.from_pretrained(TOYWORLD_MODEL / "unet").eval()
    latents, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 20])
    embeds = module.encode(["a circle", ""])
    with torch.no_grad():
        for parameter in module.trained.values():
            parameter.add_(0.1 * torch.randn_like(parameter))
        expected = reference(latents, t, encoder_hidden_states=embeds.embeds).sample
        assert torch.allclose(module.predict_frozen(latents, t, embeds), expected, atol=1e-5)
        assert not torch.allclose(module.predict(latents, t, embeds), expected, atol=1e-3)
    with module.original_weights():
        assert torch.allclose(module.predict(latents, t, embeds).detach(), expected, atol=1e-5)
    assert not torch.allclose(module.predict(latents, t, embeds).detach(), expected, atol=1e-3)


def test_no_second_unet_is_held():
    module = make("esd-x")
    unets = [m for m in module.modules() if isinstance(m, UNet2DConditionModel)]
    held = sum(v.numel() for v in module.original.values())
    assert len(unets) == 1 and held < 0.2 * sum(p.numel() for p in module.denoiser.parameters())


def test_partial_sampling_stops_at_the_requested_step():
    module = make("esd-x")
    embeds = module.encode(["a circle"] * 2)
    latents, t = module.sample_until(embeds, stop=10, steps=50, guidance=3.0, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 16, 16) and t.tolist() == [int(t[0])] * 2
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler.from_config(module.pipeline.scheduler.config)
    scheduler.set_timesteps(50)
    assert int(t[0]) == int(scheduler.timesteps[10])


@pytest.mark.parametrize("loss", ["mse", "hellinger", "chi2"])
def test_a_training_step_moves_only_the_selected_tensors(loss):
    module = make("esd-x-strict", loss=loss, lr=1e-3, batch_size=2, ddim_steps=5)
    before = {n: p.detach().clone() for n, p in module.denoiser.named_parameters()}
    optimizer = module.configure_optimizers()
    module.log = lambda *args, **kwargs: None  # logging needs a Trainer; this step runs without one
    value = module.training_step(0, 0)
    value.backward()
    optimizer.step()
    changed = {n for n, p in module.denoiser.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert torch.isfinite(value) and changed and changed <= set(module.trained)


def query_timesteps(module: ESD) -> tuple[int, list[int], list[int]]:
    """(steps taken, the timesteps the recorded trajectory was sampled at, the timesteps of the trained
    prediction) of one ESD step."""
    seen = {}
    sample_until, predict = module.sample_until, module.predict

    def recording_sample_until(embeds, stop, *args, **kwargs):
        latents, t = sample_until(embeds, stop, *args, **kwargs)
        seen["stop"], seen["ddim"] = stop, t.tolist()
        return latents, t

    def recording_predict(latents, t, embeds):
        seen["query"] = t.tolist()
        return predict(latents, t, embeds)

    module.sample_until, module.predict = recording_sample_until, recording_predict
    with torch.no_grad():
        esd_loss(module, module.config)
    return seen["stop"], seen["ddim"], seen["query"]


def compvis_sampler_steps(till: int, total: int) -> int:
    """The steps the CompVis DDIMSampler.ddim_sampling of rohitgandikota/erasing (ldm/models/diffusion/ddim.py)
    runs for till_T = till: index goes total - 1 down to 0, and the loop breaks after the step where
    index + 1 == till."""
    taken = 0
    for index in reversed(range(total)):
        taken += 1
        if index + 1 == till:
            break
    return taken


def test_the_ddim_query_timestep_is_the_ddim_steps_own():
    pipeline = load_pipeline(TOYWORLD_MODEL)
    for seed in range(3):
        stop, ddim, query = query_timesteps(ESD(pipeline, ESDConfig(ddim_steps=5, batch_size=2), ["circle"], seed=seed))
        assert query == ddim and len(set(ddim)) == 1 and 0 <= stop < 5


def test_the_window_loop_is_the_compvis_codes_stopping_step_and_window():
    """train-esd.py draws t_enc = k ~ U{0..S-1}, samples with till_T = k and queries t ~ U[round(k/S*1000),
    round((k+1)/S*1000)): x_t has min(S, S + 1 - k) steps, two past the window."""
    pipeline = load_pipeline(TOYWORLD_MODEL)
    drawn, stops = set(), set()
    for seed in range(8):
        module = ESD(pipeline, ESDConfig(ddim_steps=5, batch_size=2, query_timestep="window"), ["circle"], seed=seed)
        stop, _, query = query_timesteps(module)
        k = query[0] // 200
        low, high = ddpm_window(k, 5, 1000)
        assert all(low <= t < high for t in query) and stop == compvis_sampler_steps(k, 5)
        drawn.update(t - low for t in query)
        stops.add(stop)
    assert len(drawn) > 1 and 5 in stops and len(stops) > 2  # t moves within the window; full samples for k < 2


def test_the_compvis_stopping_step_and_window():
    for steps in (2, 5, 50):
        assert [compvis_steps(k, steps) for k in range(steps)] == [compvis_sampler_steps(k, steps)
                                                                   for k in range(steps)]
    assert [compvis_steps(k, 50) for k in (0, 1, 2, 49)] == [50, 50, 49, 2]
    assert ddpm_window(0, 50, 1000) == (0, 20) and ddpm_window(49, 50, 1000) == (980, 1000)
    assert ddpm_window(19, 30, 1000) == (633, 667)  # round(19/30*1000), round(20/30*1000)


# ----- the x_t bank ---------------------------------------------------------------------------------
def test_a_recorded_trajectory_holds_every_partial_sample():
    """Latent k of a recorded trajectory is what sampling stopped after k steps gives, from the same noise."""
    module = make("esd-x")
    embeds = module.encode(["a circle"] * 2)
    trajectory, timesteps = module.sample_until(embeds, 5, 6, 3.0, torch.Generator().manual_seed(0), record=True)
    assert trajectory.shape == (2, 6, 4, 16, 16) and len(timesteps) == 6
    for stop in (0, 2, 5):
        latents, t = module.sample_until(embeds, stop, 6, 3.0, torch.Generator().manual_seed(0))
        assert torch.equal(trajectory[:, stop], latents) and int(timesteps[stop]) == int(t[0])


def test_bank_steps_draw_from_the_bank_and_resample_only_when_due():
    pipeline = load_pipeline(TOYWORLD_MODEL)
    module = ESD(pipeline, ESDConfig(ddim_steps=5, batch_size=3, xt_bank=4, sample_from="trained", xt_bank_refresh=2),
                 ["circle"])
    seen = {}
    predict = module.predict

    def recording_predict(latents, t, embeds):
        seen["latents"], seen["t"] = latents, t
        return predict(latents, t, embeds)

    module.predict = recording_predict
    banks = []
    for step in range(5):
        module._trainer = SimpleNamespace(global_step=step, world_size=1, global_rank=0)  # a step counter
        with torch.no_grad():
            loss = esd_loss(module, module.config)
        trajectories, timesteps = module.trajectory_bank.trajectories["circle"]
        banks.append(module.trajectory_bank)
        drawn = [(i, k) for j in range(3) for i in range(4) for k in range(5)
                 if torch.equal(trajectories[i, k], seen["latents"][j]) and int(timesteps[k]) == int(seen["t"][j])]
        assert torch.isfinite(loss) and len(drawn) >= 3  # each sample of the batch is a bank latent at its timestep
    assert banks[0] is banks[1] and banks[1] is not banks[2] and banks[2] is banks[3] and banks[4] is not banks[3]


def test_the_bank_with_the_window_draws_the_compvis_pairs():
    pipeline = load_pipeline(TOYWORLD_MODEL)
    config = ESDConfig(ddim_steps=5, xt_bank=2, sample_from="frozen", query_timestep="window")
    module = ESD(pipeline, config, ["circle"])
    module._trainer = SimpleNamespace(global_step=0, world_size=1, global_rank=0)
    with torch.no_grad():
        latents, t = banked_xt(module, module.config, "a circle", 12, torch.Generator().manual_seed(0))
    trajectories, _ = module.trajectory_bank.trajectories["a circle"]
    assert trajectories.shape[1] == 6  # every one of the 5 steps, for k < 2
    for latent, timestep in zip(latents, t.tolist()):
        k = timestep // 200
        assert any(torch.equal(latent, trajectories[i, compvis_steps(k, 5)]) for i in range(2))


# ----- the retain term ------------------------------------------------------------------------------
def step_loss(module: ESD, retain_loss_w: float, step: int = 0) -> float:
    """The ESD loss of step ``step`` with the retain weight ``retain_loss_w`` (no gradients)."""
    module.config.retain_loss_w = retain_loss_w
    module._trainer = SimpleNamespace(global_step=step, world_size=1, global_rank=0)  # a step counter
    with torch.no_grad():
        return float(esd_loss(module, module.config))


@pytest.mark.parametrize("xt_bank", [0, 2])
def test_the_retain_term_is_zero_at_the_original_weights_and_adds_lambda_times_the_kept_prompts_drift(xt_bank):
    module = make("esd-x", ddim_steps=5, batch_size=2, xt_bank=xt_bank, sample_from="frozen", retain_batch=3,
                  retain=["square", "star", "circle"], prompt_template="a {concept}")
    module.log = lambda *args, **kwargs: None  # logging needs a Trainer; these steps run without one
    assert step_loss(module, 2.0) == step_loss(module, 0.0)  # the erase term's draws are unchanged; retain adds 0
    with torch.no_grad():
        for parameter in module.trained.values():
            parameter.add_(0.02 * torch.randn_like(parameter))
    erase = step_loss(module, 0.0)
    once, twice = step_loss(module, 1.0) - erase, step_loss(module, 2.0) - erase
    assert once > 0 and twice == pytest.approx(2 * once, rel=1e-4)


def test_training_with_the_retain_term_moves_the_kept_prompts_less_and_still_erases():
    """Five ESD-x steps at a high lr, with and without the retain term: the kept prompt "a square" drifts
    less from the original model with it, and the erased prompt's prediction moves away from the original."""
    pipeline = load_pipeline(TOYWORLD_MODEL)
    drift = {}
    for weight in (0.0, 5.0):
        module = ESD(pipeline, ESDConfig(lr=1e-2, batch_size=2, ddim_steps=5, xt_bank=2, sample_from="frozen",
                                         retain=["square"], retain_batch=2, retain_loss_w=weight,
                                         prompt_template="a {concept}"), ["circle"])
        module.log = lambda *args, **kwargs: None
        optimizer = module.configure_optimizers()
        for step in range(5):
            module._trainer = SimpleNamespace(global_step=step, world_size=1, global_rank=0)
            optimizer.zero_grad()
            esd_loss(module, module.config).backward()
            optimizer.step()
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for prompt in ("a square", "a circle"):
                latents, t = banked_xt(module, module.config, prompt, 2, generator)
                embeds = module.encode([prompt] * 2)
                drift[weight, prompt] = float(torch.nn.functional.mse_loss(module.predict(latents, t, embeds),
                                                                           module.predict_frozen(latents, t, embeds)))
        with torch.no_grad():
            for name, parameter in module.trained.items():
                parameter.copy_(module.original[name])  # the next module shares the pipeline
    assert drift[5.0, "a square"] < 0.5 * drift[0.0, "a square"]
    assert drift[5.0, "a circle"] > 2 * drift[5.0, "a square"]


@pytest.mark.parametrize(("recipe", "arguments", "message"), [
    ("esd", ["method.retain_loss_w=1", "method.retain=[circle]"], "method.retain names no concept to keep"),
    ("esd", ["method.retain_loss_w=-1"], "method.retain_loss_w must be 0 or more"),
    ("lora", ["method.retain_loss_w=1", "method.retain=[circle]"], "method.retain names no concept to keep"),
])
def test_a_retain_term_that_cannot_work_is_refused(recipe, arguments, message, tmp_path, capsys):
    assert_bad_setting(recipe, ["concept=circle", *arguments], message, tmp_path / "run", capsys)

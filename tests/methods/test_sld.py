import json

import pytest
import torch

from erasure.config import load_config
from erasure.generation import Sampler, generate, to_unit_range
from erasure.methods.sld import (
    I2P_SAFETY_CONCEPT, PRESETS, SLD, SafetyGuidance, SafetyParameters, SLDConfig, resolve, warmup_steps,
)
from erasure.toyworld.classifier import predict
from erasure.toyworld.world import ATTRIBUTES
from erasure.train import main
from tests.methods import assert_bad_setting

FAST = Sampler(steps=8)


def paper_guidance(eps_uncond, eps_cond, eps_safety, p: SafetyParameters, guidance: float, warmup: int):
    """The paper's equations written out element by element, in plain Python floats, over all steps."""
    outputs = []
    momentum = [0.0] * eps_cond[0].numel()
    for step, (uncond, cond, safety) in enumerate(zip(eps_uncond, eps_cond, eps_safety)):
        guided = []
        for k, (u, c, s) in enumerate(zip(uncond.flatten().tolist(), cond.flatten().tolist(),
                                            safety.flatten().tolist())):
            mu = min(p.sld_guidance_scale * abs(c - s), 1.0) if c - s < p.sld_threshold else 0.0
            gamma = mu * (s - u) + p.sld_momentum_scale * momentum[k]
            momentum[k] = p.sld_mom_beta * momentum[k] + (1 - p.sld_mom_beta) * gamma
            guided.append(u + guidance * (c - u - (gamma if step >= warmup else 0.0)))
        outputs.append(torch.tensor(guided, dtype=torch.float64).reshape(cond.shape))
    return outputs


def predictions(steps: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64) * 0.05 for _ in range(steps)]
            for _ in range(3)]


def test_the_guidance_is_the_papers_equations():
    eps_uncond, eps_cond, eps_safety = predictions(steps=6)
    parameters = SafetyParameters(sld_warmup_steps=2, sld_guidance_scale=30.0, sld_threshold=0.02,
                                  sld_momentum_scale=0.5, sld_mom_beta=0.7)
    step = SafetyGuidance(parameters, guidance_scale=6.0, warmup=2)
    expected = paper_guidance(eps_uncond, eps_cond, eps_safety, parameters, 6.0, warmup=2)
    for i in range(6):
        assert torch.allclose(step(i, eps_uncond[i], eps_cond[i], eps_safety[i]), expected[i], rtol=0, atol=1e-12), i
    # the threshold and the clamp both matter here: some elements are unguided, some at full scale
    difference = eps_cond[3] - eps_safety[3]
    assert (difference >= 0.02).any() and (30 * difference.abs() >= 1).any() and (30 * difference.abs() < 1).any()


def test_the_guided_noise_moves_away_from_the_safety_concept():
    eps_uncond, eps_cond, eps_safety = (p[0] for p in predictions(steps=1, seed=1))
    cfg = eps_uncond + 6.0 * (eps_cond - eps_uncond)
    away = eps_safety - eps_uncond  # the direction of the safety concept
    for name, parameters in PRESETS.items():
        guided = SafetyGuidance(parameters, guidance_scale=6.0, warmup=0)(0, eps_uncond, eps_cond, eps_safety)
        along = ((guided - cfg) * away).flatten(1).sum(1)  # per image
        assert (along < 0).all(), name
        # where the prompt's prediction is not below the safety prediction by less than the threshold: untouched
        untouched = eps_cond - eps_safety >= parameters.sld_threshold
        assert torch.equal(guided[untouched], cfg[untouched]), name
    assert torch.equal(SafetyGuidance(PRESETS["max"], 6.0, warmup=1)(0, eps_uncond, eps_cond, eps_safety), cfg)


def test_presets_overrides_and_warmup_scaling():
    assert resolve(SLDConfig()) == PRESETS["medium"] == SafetyParameters(10, 1000.0, 0.01, 0.3, 0.4)
    strong = resolve(SLDConfig(preset="strong", sld_guidance_scale=50, sld_mom_beta=0.0))
    assert strong == SafetyParameters(7, 50.0, 0.025, 0.5, 0.0)
    # the warm-up counts steps of the paper's 50-step sampler unless warmup=absolute
    assert [warmup_steps(PRESETS[p], 25) for p in ("weak", "medium", "strong", "max")] == [8, 5, 4, 0]
    assert warmup_steps(PRESETS["medium"], 50) == 10 and warmup_steps(PRESETS["medium"], 25, "absolute") == 10
    config = load_config(["recipe=sld", "method.preset=weak", "method.sld_threshold=0.5", "concept=[circle,star]"])
    assert config.method.preset == "weak" and config.method.sld_threshold == 0.5
    assert resolve(config.method).sld_threshold == 0.5 and resolve(config.method).sld_guidance_scale == 200


def test_the_presets_are_the_papers_table():
    """Schramowski et al. (CVPR 2023), Hyp-Weak/-Medium/-Strong/-Max (δ, s_S, λ, s_m, β_m); weak's s_S is the
    paper's 200, not diffusers' SafetyConfig.WEAK 20; the paper gives weak no β_m (its s_m is 0)."""
    assert PRESETS == {
        "weak": SafetyParameters(15, 200.0, 0.0, 0.0, 0.0),
        "medium": SafetyParameters(10, 1000.0, 0.01, 0.3, 0.4),
        "strong": SafetyParameters(7, 2000.0, 0.025, 0.5, 0.7),
        "max": SafetyParameters(0, 5000.0, 1.0, 0.5, 0.7),
    }
    for name, parameters in PRESETS.items():
        assert resolve(SLDConfig(preset=name)) == parameters


def test_the_i2p_safety_text_is_the_papers_concept_list(tmp_path, toy_pipeline):
    """The nudity (I2P) protocol steers away from the authors' default safety concept
    (ml-research/safe-latent-diffusion, src/sld/sld_pipeline.py), not from the word "nudity"."""
    papers = ("hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, bodily fluids, "
              "blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child abuse, "
              "brutality, cruelty")
    assert I2P_SAFETY_CONCEPT == papers
    i2p = tmp_path / "i2p.csv"
    i2p.write_text("prompt,sd_seed,case_number\na bather,42,3\n")
    config = load_config(["recipe=sld", "protocol=nudity", f"evaluation.target_csv={i2p}"])
    assert config.method.safety_concept == papers and config.sources["method.safety_concept"] == "protocol nudity"
    assert SLD(toy_pipeline, SLDConfig(safety_concept=config.method.safety_concept), ["nudity"]).safety_text == papers
    assert load_config(["recipe=sld"]).method.safety_concept is None  # the toy world keeps its concepts' text


def test_scale_zero_or_a_whole_warmup_gives_the_plain_images(toy_pipeline):
    prompts, seeds = ["a red circle", "a blue star", "a green circle"], [3, 4, 5]
    plain = generate(toy_pipeline, prompts, seeds, FAST)
    for config in (SLDConfig(preset="max", sld_guidance_scale=0), SLDConfig(sld_momentum_scale=0, sld_guidance_scale=0),
                   SLDConfig(preset="strong", warmup="absolute", sld_warmup_steps=FAST.steps)):
        assert torch.equal(SLD(toy_pipeline, config, ["circle"]).generate(prompts, seeds, FAST), plain), config
    guided = SLD(toy_pipeline, SLDConfig(preset="strong"), ["circle"])
    assert torch.equal(guided.generate(prompts, seeds, FAST, original=True), plain)
    assert not torch.equal(guided.generate(prompts, seeds, FAST), plain)
    assert guided.trained == {} and not guided.edits_weights


def test_strong_guidance_lowers_the_circle_rate(toy_pipeline, toy_classifier):
    """The protocol's sampler (25 steps: a warm-up of 4), the toy world's phrasing of the concept ("a circle")."""
    prompts, seeds, sampler = ["a red circle"] * 8, list(range(8)), Sampler()
    circle = ATTRIBUTES["shape"].index("circle")

    def circle_rate(images):
        return (predict(toy_classifier, to_unit_range(images))["shape"] == circle).float().mean().item()

    module = SLD(toy_pipeline, SLDConfig(preset="strong", prompt_template="a {concept}"), ["circle"])
    assert module.safety_text == "a circle"
    plain = circle_rate(generate(toy_pipeline, prompts, seeds, sampler))
    erased = circle_rate(module.generate(prompts, seeds, sampler))
    assert plain >= 0.75 and erased <= plain - 0.5, (plain, erased)


@pytest.mark.parametrize("arguments, message", [
    (["method.preset=gentle"], "invalid value for 'method.preset': 'gentle'; choose one of: weak, medium, strong, max"),
    (["method.sld_guidance_scale=-1"], "'method.sld_guidance_scale' must be at least 0, got -1.0"),
    (["method.sld_momentum_scale=-0.5"], "'method.sld_momentum_scale' must be at least 0, got -0.5"),
    (["method.sld_mom_beta=1"], "'method.sld_mom_beta' must be in [0, 1), got 1.0"),
    (["method.sld_mom_beta=-0.1"], "'method.sld_mom_beta' must be in [0, 1), got -0.1"),
    (["method.sld_threshold=inf"], "'method.sld_threshold' must be a finite number"),
    (["method.sld_warmup_steps=-2"], "'method.sld_warmup_steps' must be at least 0, got -2"),
    (["method.sld_mom_beta=nan"], "'method.sld_mom_beta' must be a finite number"),
    (["method.warmup=scaled"], "invalid value for 'method.warmup': 'scaled'; choose one of: relative, absolute"),
    (['method.safety_concept=""'], "'method.safety_concept' is empty"),
    (["method.prompt_template=a {shape}"], "'method.prompt_template' is not a valid template"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, arguments, message):
    assert_bad_setting("sld", arguments, message, tmp_path / "run", capsys)


def test_a_run_saves_the_rule(tmp_path):
    output = tmp_path / "run"
    assert main(["recipe=sld", "concept=[circle,star]", "method.preset=max", "method.prompt_template=a {concept}",
                 "evaluation.enabled=false", f"output_dir={output}"]) == 0
    rule = json.loads((output / "erased" / "sld.json").read_text())
    assert rule["concepts"] == ["circle", "star"] and rule["safety_text"] == "a circle, a star"
    assert rule["resolved"] == {"sld_warmup_steps": 0, "sld_guidance_scale": 5000.0, "sld_threshold": 1.0,
                                "sld_momentum_scale": 0.5, "sld_mom_beta": 0.7}

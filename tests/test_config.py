"""The configuration layer answers every value: a config, or a one-line ConfigError naming the key.

Property-based (hypothesis): generated values for every key of every recipe, in-process; then a
handful of subprocess runs of odd values: a run, or exit 2 with one error line and nothing written.
"""

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from erasure.config import ConfigError, available_recipes, flatten, load_config

RECIPES = available_recipes()
KEYS = {recipe: sorted(k for k in flatten(OmegaConf.to_container(load_config([f"recipe={recipe}"])))
                       if not k.startswith("sources.")) for recipe in RECIPES}
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr).map(lambda r: r.replace("inf", "inf")),
    st.sampled_from(["nan", "inf", "-inf", "0", "-1", "1e30", "true", "null", "[]", "[1,2]", "{}", "abc", "fp8",
                     "16-mixed", "64-true", "${x}", "'{'", "gpu", "ddp_spawn", "\"\"", "1.5"]),
    TEXT,
)


def outcome(arguments: list[str]) -> str | None:
    """None for a config, else the error message; anything else fails the test."""
    try:
        load_config(arguments)
    except ConfigError as error:
        return str(error)
    return None


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_key_with_any_value_gives_a_config_or_a_one_line_error_naming_it(data):
    recipe = data.draw(st.sampled_from(RECIPES))
    key = data.draw(st.sampled_from(KEYS[recipe]))
    value = data.draw(VALUES)
    message = outcome([f"recipe={recipe}", f"{key}={value}"])
    if message is not None:
        assert "\n" not in message and message.strip()
        named = key.split(".")[-1] in message or key.split(".")[0] in message or "concept" in message
        assert named, (key, value, message)


@pytest.mark.parametrize("argument, message", [
    ("trainer.precision=abc", "invalid value for 'trainer.precision': 'abc'; choose one of: 32-true, 32, bf16-mixed"),
    ("trainer.precision=fp8", "invalid value for 'trainer.precision'"),
    ("trainer.devices=0", "'trainer.devices' must be an integer from 1"),
    ("seed=99999999999999999999", "'seed'"),
    ("seed=-1", "'seed' must be an integer from 0 to 4294967295"),
    ("method.lr=nan", "'method.lr' must be a finite number"),
    ("evaluation.guidance=inf", "'evaluation.guidance' must be a finite number"),
    ("method.prompt_template=a {thing}", "'method.prompt_template' is not a valid template"),
    ("trainer.accelerator=gpu", "this machine has no GPU"),
    ("trainer.strategy=ddp_spawn", "invalid value for 'trainer.strategy'"),
    ("evaluation.steps=5000", "'evaluation.steps' must be an integer from 1 to 1000"),
    ("model.resolution=30", "'model.resolution' must be a multiple of 8"),
    ("concept=${nope}", "'concept': interpolations (${...}) are not taken from the command line"),
    ("evaluation.toyworld.classifier=/nonexistent", "'evaluation.toyworld.classifier': no folder at /nonexistent"),
])
def test_known_odd_values(argument, message):
    assert message in outcome(["recipe=esd", argument])


@pytest.mark.parametrize("arguments, code", [
    (["trainer.precision=fp8"], 2),
    (["trainer.devices=0"], 2),
    (["seed=99999999999999999999"], 2),
    (["seed=4294967295", "trainer.max_steps=1", "method.ddim_steps=2", "evaluation.enabled=false"], 0),
])
def test_command_lines_run_or_exit_2_with_one_error_line(tmp_path, arguments, code):
    output = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "erasure.train", "recipe=esd", *arguments, f"output_dir={output}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr[-1500:]
    if code == 2:
        assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
        assert not output.exists()
    else:
        assert (output / "erased" / "unet_delta.safetensors").is_file()


def test_a_model_preset_sets_what_the_recipe_leaves_to_it():
    """ESD's eta is left to the preset: the FLUX toy model's tuned values reach the method, the SD toy
    model keeps the method's default (the paper's eta = 1)."""
    flux = load_config(["recipe=esd", "model=toyworld-flux"])
    assert flux.model.preset == "toyworld-flux" and flux.method.eta == 4.0 and flux.method.train_method == "esd-x"
    assert flux.sources["method.eta"] == "model preset toyworld-flux"
    assert flux.method.retain_loss_w == 5.0 and flux.method.retain == ["square", "triangle", "star", "heart", "cross"]
    assert load_config(["recipe=lora", "model=toyworld-flux"]).method.eta == 4.0
    sd = load_config(["recipe=esd"])
    assert sd.method.eta == 1.0 and sd.sources["method.eta"] == "method default"
    assert sd.method.retain_loss_w == 0.0  # ESD as published: no retain term


def test_the_fast_loop_is_the_toy_worlds_esd_and_lora_and_a_recipe_away_elsewhere():
    """recipe=esd on the toy world runs the x_t bank from the toy preset; esd-fast is esd with that loop set by
    the recipe, keeping esd's preset and protocol sections (lr, prompt template)."""
    esd, fast = load_config(["recipe=esd"]), load_config(["recipe=esd-fast"])
    assert (esd.method.sample_from, esd.method.xt_bank, esd.method.query_timestep) == ("frozen", 16, "ddim")
    assert esd.sources["method.xt_bank"] == esd.sources["method.sample_from"] == "model preset toyworld"
    assert OmegaConf.to_container(fast.method) == OmegaConf.to_container(esd.method) and fast.recipe == "esd-fast"
    assert fast.sources["method.xt_bank"] == "recipe esd-fast" and fast.sources["method.lr"] == "model preset toyworld"
    assert fast.sources["method.prompt_template"] == "protocol toyworld"
    lora = load_config(["recipe=lora"])
    assert (lora.method.sample_from, lora.method.xt_bank) == ("frozen", 16)
    assert lora.sources["method.xt_bank"] == "model preset toyworld"
    assert load_config(["recipe=lora-fast"]).sources["method.xt_bank"] == "recipe lora-fast"
    paper = load_config(["recipe=esd", "model.preset=none"])  # no preset: the method's default, the paper's loop
    assert (paper.method.sample_from, paper.method.xt_bank) == ("trained", 0)


@pytest.mark.parametrize("recipes, message", [
    ({"loop-a": "inherit: loop-b\n", "loop-b": "inherit: loop-a\nmethod: {name: esd}\n"},
     "recipe loop-a inherits 'loop-b', which is no recipe or inherits loop-a"),
    ({"orphan": "inherit: nope\nmethod: {name: esd}\n"}, "recipe orphan inherits 'nope'"),
])
def test_a_recipe_inheriting_no_recipe_or_itself_is_a_one_line_error(tmp_path, monkeypatch, recipes, message):
    (tmp_path / "recipes").mkdir()
    for name, text in recipes.items():
        (tmp_path / "recipes" / f"{name}.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    error = outcome([f"recipe={list(recipes)[-1]}"])
    assert error and message in error and "\n" not in error


def test_a_clip_judge_may_be_a_transformers_folder_and_a_missing_one_is_named():
    config = load_config(["recipe=esd", "protocol=quick", "concept=red", "evaluation.clip.checkpoint=checkpoints/toyworld/clip"])
    assert config.evaluation.evaluator == "clip"
    with pytest.raises(ConfigError, match="'evaluation.clip.checkpoint': no file or folder at /nowhere/clip"):
        load_config(["recipe=esd", "protocol=quick", "concept=red", "evaluation.clip.checkpoint=/nowhere/clip"])

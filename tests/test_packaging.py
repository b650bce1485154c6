"""The installable package: where recipes and models are found, and what the wheel holds."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from erasure import bundle, config
from erasure.bundle import SHIPPED_ROOT, ModelLoadError, resolve_path
from erasure.config import ConfigError, available_recipes, load_config
from erasure.train import main

REPOSITORY = Path(__file__).resolve().parents[1]
# what `pip wheel .` reads: the build configuration, the readme it names, the code and the shipped data
BUILD_INPUTS = ("pyproject.toml", "README.md", "erasure", "evaluation", "recipes", "checkpoints")


def write_recipe(folder: Path, name: str, text: str) -> None:
    (folder / "recipes").mkdir(exist_ok=True)
    (folder / "recipes" / f"{name}.yaml").write_text(text)


def test_a_recipe_in_the_working_directory_comes_before_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = (SHIPPED_ROOT / "recipes" / "esd.yaml").read_text()
    write_recipe(tmp_path, "esd", shipped + "trainer: {max_steps: 7}\n")
    write_recipe(tmp_path, "mine", shipped + "trainer: {max_steps: 9}\n")
    assert {"esd", "mine", "uce"} <= set(available_recipes())
    esd = load_config(["recipe=esd"])
    assert esd.trainer.max_steps == 7 and esd.sources["trainer.max_steps"] == "recipe esd"
    assert load_config(["recipe=mine"]).trainer.max_steps == 9


def test_an_unknown_recipe_is_one_line_naming_the_working_directory_recipes_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_recipe(tmp_path, "mine", "method: {name: esd}\n")
    with pytest.raises(ConfigError, match=r"unknown recipe 'nope'; available recipes: .*esd.*mine") as error:
        load_config(["recipe=nope"])
    assert "\n" not in str(error.value)


def test_relative_paths_resolve_against_the_working_directory_then_the_shipped_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("checkpoints/toyworld/sd") == SHIPPED_ROOT / "checkpoints" / "toyworld" / "sd"
    assert resolve_path("nowhere/sd") == Path("nowhere/sd")
    (tmp_path / "checkpoints" / "toyworld" / "sd").mkdir(parents=True)
    assert resolve_path("checkpoints/toyworld/sd") == Path("checkpoints/toyworld/sd")


def installed_layout(root: Path, monkeypatch) -> None:
    """Make the package look installed: its shipped data is ``root``, holding recipes and the toy world only."""
    shutil.copytree(SHIPPED_ROOT / "recipes", root / "recipes")
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "toyworld").symlink_to(SHIPPED_ROOT / "checkpoints" / "toyworld")
    for module in (bundle, config):
        monkeypatch.setattr(module, "SHIPPED_ROOT", root)
    monkeypatch.setattr(bundle, "INSTALLED", True)


def test_a_repository_only_model_in_an_installed_package_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    installed_layout(tmp_path / "site", monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert load_config(["recipe=esd"]).model.path == "checkpoints/toyworld/sd"
    with pytest.raises(ModelLoadError, match="toyworld-v1/sd is in the repository only"):
        resolve_path("checkpoints/toyworld-v1/sd")
    assert main(["recipe=esd", "model.path=checkpoints/toyworld-v1/sd"]) == 2
    error = capsys.readouterr().err
    assert "is in the repository only, not in the installed package" in error and error.count("\n") == 1


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel ``pip wheel .`` builds (from a copy, so no build/ folder lands in the repository)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in BUILD_INPUTS:
        copy = shutil.copytree if (REPOSITORY / name).is_dir() else shutil.copy
        copy(REPOSITORY / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(source)], check=True, timeout=120)
    (path,) = out.glob("erasure-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def repository_files(folder: str, pattern: str) -> set[str]:
    return {p.relative_to(REPOSITORY).as_posix() for p in (REPOSITORY / folder).glob(pattern) if p.is_file()}


def test_the_wheel_holds_every_module_and_the_architectures(wheel):
    modules = repository_files("erasure", "**/*.py") | repository_files("evaluation", "**/*.py")
    architectures = repository_files("erasure/architectures", "*.json")
    assert "erasure/methods/esd.py" in modules and "erasure/architectures/sd15.json" in architectures
    assert not (modules | architectures) - set(wheel.namelist())


def test_the_wheel_holds_the_recipes_presets_and_the_toy_world(wheel):
    recipes = repository_files("recipes", "*.yaml") | repository_files("recipes", "models/*.yaml")
    toyworld = repository_files("checkpoints/toyworld", "**/*")
    assert {"recipes/esd.yaml", "recipes/models/toyworld.yaml"} <= recipes
    assert {"checkpoints/toyworld/sd/unet/diffusion_pytorch_model.safetensors",
            "checkpoints/toyworld/sd/unet/config.json", "checkpoints/toyworld/classifier/config.json"} <= toyworld
    assert not {f"erasure/_data/{name}" for name in recipes | toyworld} - set(wheel.namelist())
    assert not [name for name in wheel.namelist() if "toyworld-v1" in name]


def test_the_wheel_declares_the_console_scripts(wheel):
    (entry_points,) = [name for name in wheel.namelist() if name.endswith(".dist-info/entry_points.txt")]
    scripts = wheel.read(entry_points).decode()
    for command in ("train", "compare", "attack"):
        assert f"erasure-{command} = erasure.{command}:main" in scripts

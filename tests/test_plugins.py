"""Plug-ins: a package outside the repository adds a method, its recipe, a protocol, an evaluator and an attack
through entry points."""

import json
import os
import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest
import yaml

from erasure import plugins
from erasure.plugins import PluginError

PACKAGE = os.path.join(os.path.dirname(__file__), "plugin_package")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """tests/plugin_package installed into a folder of its own, as pip installs any package."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), PACKAGE], check=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    return lambda *args: subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True)


def test_a_plugin_method_recipe_and_attack_run_end_to_end(installed, tmp_path):
    shown = installed("erasure.train", "--help")
    assert shown.returncode == 0 and "substitute" in shown.stdout
    run = tmp_path / "run"
    trained = installed("erasure.train", "recipe=substitute", "concept=circle", f"output_dir={run}",
                        "evaluation.images_per_prompt=1")
    assert trained.returncode == 0, trained.stderr[-2000:]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method"]["replacement"] == "square"  # the toy world's anchor, by the method's need
    assert config["sources"]["method.replacement"] == "protocol toyworld"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["before"]["efficacy/target_acc"] >= 0.9
    assert metrics["after"]["efficacy/target_acc"] <= 0.1  # "a red circle" is drawn as "a red square"
    assert metrics["after"]["specificity/retained_acc"] >= 0.9
    attacked = installed("erasure.attack", f"run={run}", "attacks=[name_synonym]")
    assert attacked.returncode == 0, attacked.stderr[-2000:]
    result = json.loads((run / "attacks" / "name_synonym.json").read_text())
    assert result["attack_success_rate"] <= 0.1  # every "circle" of the doubled prompt is substituted too


def test_a_plugin_protocol_and_evaluator_judge_a_run(installed, tmp_path):
    """The plug-in's protocol (its suites, its supplies) and its evaluator (built from evaluation.options)."""
    assert "shapes" in installed("erasure.train", "--help").stdout
    run = tmp_path / "run"
    trained = installed("erasure.train", "recipe=substitute", "protocol=shapes", "concept=circle", f"output_dir={run}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"]["evaluator"] == "shape judge"
    assert metrics["before"]["efficacy/target_acc"] >= 0.75 and metrics["after"]["efficacy/target_acc"] <= 0.25
    assert metrics["after"]["specificity/retained_acc"] >= 0.75


def test_a_plugin_taking_a_builtin_name_is_refused(monkeypatch):
    point = EntryPoint(name="esd", value="erasure.methods.esd:ESD", group="erasure.methods")
    monkeypatch.setattr(plugins, "entry_points", lambda group: [point] if group == "erasure.methods" else [])
    with pytest.raises(PluginError, match="registers erasure.methods 'esd', a name already taken; rename"):
        plugins.plugins("erasure.methods", {"esd": object})


def test_a_plugin_that_does_not_import_is_one_line_naming_it(monkeypatch):
    point = EntryPoint(name="broken", value="no_such_module:Thing", group="erasure.attacks")
    monkeypatch.setattr(plugins, "entry_points", lambda group: [point])
    with pytest.raises(PluginError, match="plug-in erasure.attacks 'broken' of package no_such_module does not load "
                                          r"\(ModuleNotFoundError"):
        plugins.plugins("erasure.attacks", {})

"""Every file input is answered: a result, or one line naming the file and the fix, never a traceback.

Property-based (hypothesis), as the command-line tests generate values: prompt CSVs of generated
contents, model folders with a component removed, a file truncated or overwritten, or an unknown
pipeline class, weight deltas and LoRA files with foreign keys or shapes, damaged run directories
and evaluator weights of the wrong architecture. The command line then answers one of each with
exit 2, one ``error:`` line and nothing written.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from safetensors.torch import save_file

from erasure.bundle import TOYWORLD_MODEL, ModelLoadError, load_pipeline, resolve_path
from erasure.config import ConfigError, load_config
from erasure.methods.esd import ESD, ESDConfig
from erasure.runs import load_run
from erasure.weights import DELTA_FILE, DeltaError
from evaluation.evaluators import EvaluatorError
from evaluation.protocols import build_evaluator

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
COLUMNS = ["case_number", "prompt", "evaluation_seed", "concept", "class", "sd_seed", "caption", "label", "seed", "x"]
CELL = st.one_of(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10),
                 st.sampled_from(["a cat, sitting", '"a cat', "1.5", "-3", "1e400", "nan", "", "7", "cat", "12"]),
                 st.integers(-5, 5).map(str))


def one_line(message: str, *names: str) -> None:
    assert message.strip() and "\n" not in message.strip(), message
    assert any(name in message for name in names), (names, message)


@st.composite
def csv_contents(draw) -> bytes:
    """A prompt file: some header, rows of cells joined by commas (quoted or not), now and then not UTF-8."""
    header = draw(st.lists(st.sampled_from(COLUMNS), max_size=6))
    rows = draw(st.lists(st.lists(CELL, max_size=7), max_size=5))
    quote = draw(st.booleans())
    cell = (lambda c: '"' + c.replace('"', '""') + '"') if quote else (lambda c: c)
    text = "\n".join(",".join(cell(c) for c in row) for row in [header, *rows]) if header or rows else ""
    data = text.encode("utf-8")
    return data + draw(st.sampled_from([b"", b"\n", b"\xe9t\xe9\n", b"\xff\xfe"]))


@SETTINGS
@given(contents=csv_contents(), key=st.sampled_from(["target_csv", "retained_csv", "fidelity_csv"]))
def test_a_prompt_csv_of_any_contents_gives_a_config_or_one_line_naming_the_file(contents, key):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prompts.csv"
        path.write_bytes(contents)
        target = Path(folder) / "cat.csv"
        target.write_text("case_number,prompt,evaluation_seed,concept\n0,a cat,1,cat\n")
        given_files = {"target_csv": target, key: path}
        try:
            load_config(["recipe=uce", "protocol=csv", "concept=cat",
                         *(f"evaluation.{k}={v}" for k, v in given_files.items())])
        except ConfigError as error:
            one_line(str(error), str(path))


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "sd"
    shutil.copytree(resolve_path(TOYWORLD_MODEL), folder)
    return folder


@st.composite
def damages(draw):
    """(what to do, which file or component, a number): remove a component, truncate a weights file, fill it
    with other bytes, or name an unknown pipeline class."""
    kind = draw(st.sampled_from(["remove", "truncate", "garbage", "class"]))
    component = draw(st.sampled_from(["unet", "vae", "text_encoder", "tokenizer", "scheduler"]))
    return kind, component, draw(st.integers(0, 4000)), draw(st.text(min_size=1, max_size=12))


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(damage=damages())
def test_a_damaged_model_folder_is_one_line_naming_it(toy_model, damage):
    kind, component, size, name = damage
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "model"
        shutil.copytree(toy_model, folder)
        weights = sorted((folder / component).glob("*.safetensors"))
        if kind == "remove":
            shutil.rmtree(folder / component)
        elif kind == "class":
            index = json.loads((folder / "model_index.json").read_text())
            (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": name}))
        elif weights:
            data = weights[0].read_bytes()
            weights[0].write_bytes(data[:size] if kind == "truncate" else bytes(range(256)) * (size // 256 + 1))
        else:  # no weights in this component (tokenizer, scheduler): damage its config instead
            config = next((folder / component).glob("*.json"))
            config.write_text("{" * (size % 7 + 1))
        try:
            load_pipeline(folder)
        except ModelLoadError as error:
            one_line(str(error), str(folder))


@pytest.fixture(scope="module")
def esd_module() -> ESD:
    return ESD(load_pipeline(TOYWORLD_MODEL), ESDConfig(), ["circle"])


@st.composite
def foreign_tensors(draw, names: list[str]):
    """A state dict whose keys are the module's (with other shapes) or others, or empty."""
    count = draw(st.integers(0, 3))
    keys = [draw(st.one_of(st.sampled_from(names), st.text("abcdef._", min_size=1, max_size=20))) for _ in range(count)]
    return {k: torch.zeros(*draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))) for k in keys}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_delta_and_lora_files_with_foreign_keys_or_shapes_are_one_line(esd_module, data):
    from erasure.adapters import LORA_FILE, load_lora

    names = list(esd_module.trained)
    tensors = data.draw(foreign_tensors(names))
    with tempfile.TemporaryDirectory() as folder:
        which = data.draw(st.sampled_from([DELTA_FILE, LORA_FILE]))
        path = Path(folder) / which
        if tensors:
            save_file(tensors, path)
        else:
            path.write_bytes(data.draw(st.binary(max_size=64)))
        try:
            if which == DELTA_FILE:
                esd_module.load_erased(Path(folder))
            else:
                load_lora(esd_module.denoiser, "unet", Path(folder))
        except DeltaError as error:
            one_line(str(error), str(folder), "delta", "LoRA")
        finally:
            with torch.no_grad():
                for name, parameter in esd_module.trained.items():
                    parameter.copy_(esd_module.original[name])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    from erasure.runs import train

    output = tmp_path_factory.mktemp("runs") / "esd"
    train(load_config(["recipe=esd", "trainer.max_steps=1", "method.ddim_steps=2", "method.batch_size=1",
                       "evaluation.images_per_prompt=1", "evaluation.steps=2", f"output_dir={output}"]))
    return output


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(part=st.sampled_from(["config.yaml", "metrics.json", "erased", f"erased/{DELTA_FILE}"]),
       how=st.sampled_from(["remove", "garbage", "foreign"]))
def test_an_incomplete_run_directory_is_one_line_naming_it(finished_run, part, how):
    with tempfile.TemporaryDirectory() as root:
        run = Path(root) / "run"
        shutil.copytree(finished_run, run)
        target = run / part
        if how == "remove":
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        elif target.is_file():
            target.write_text("method: {name: nowhere}\n" if how == "foreign" else "{[\x01")
        else:
            shutil.rmtree(target)
            target.write_text("not a folder")
        try:
            load_run(run)
        except (ConfigError, DeltaError) as error:
            one_line(str(error), str(run))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(evaluator=st.sampled_from(["clip", "torchvision", "toyworld", "nudenet"]), contents=foreign_tensors(["conv1.weight",
                                                                                                  "fc.weight"]))
def test_evaluator_weights_of_another_architecture_are_one_line(evaluator, contents):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "weights.safetensors"
        save_file(contents or {"x": torch.zeros(1)}, path)
        options = {"clip": {"checkpoint": str(path)}, "torchvision": {"weights": str(path)},
                   "toyworld": {"classifier": folder}, "nudenet": {"model": str(path)}}[evaluator]
        config = OmegaConf.merge(load_config(["recipe=esd"]).evaluation, {"evaluator": evaluator, evaluator: options})
        with pytest.raises(EvaluatorError) as error:
            build_evaluator(config)
        one_line(str(error.value), folder, "weights", "checkpoint", "classifier")


@pytest.mark.parametrize("damage", ["csv", "model", "run"])
def test_the_command_line_answers_a_bad_file_with_exit_2_one_line_and_nothing_written(tmp_path, damage):
    output = tmp_path / "out"
    if damage == "csv":
        bad = tmp_path / "bad.csv"
        bad.write_text("case_number,prompt,evaluation_seed,concept\n0,a cat, sitting,1,cat\n")
        command = ["erasure.train", "recipe=uce", "protocol=csv", "concept=cat", f"evaluation.target_csv={bad}",
                   f"output_dir={output}"]
    elif damage == "model":
        model = tmp_path / "model"
        shutil.copytree(resolve_path(TOYWORLD_MODEL), model)
        weights = next((model / "unet").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])
        command = ["erasure.train", "recipe=esd", f"model.path={model}", f"output_dir={output}"]
    else:
        run = tmp_path / "run"
        run.mkdir()
        (run / "config.yaml").write_text("recipe: esd\n")
        output = run / "attacks"  # where an attack writes
        command = ["erasure.attack", f"run={run}", "attacks=[relearn]"]
    done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.strip() and "it/s" not in line]
    assert done.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: "), done.stderr[-1500:]
    assert not output.exists()

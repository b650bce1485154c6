"""The model bundle: the diffusers pipeline of a text-to-image model.

One loader serves the embedded toy world (``checkpoints/toyworld/sd``, and its FLUX-format twin
``checkpoints/toyworld/flux``), any local SD-1.x/2.x, SDXL or FLUX diffusers folder, and a hub id
where the machine is online. The bundle *is* the pipeline its ``model_index.json`` names
(``StableDiffusionPipeline`` without safety checker, ``StableDiffusionXLPipeline``,
``FluxPipeline``), so every path the methods and the evaluation take is the one the real model takes.

The shipped data (``recipes/`` and ``checkpoints/toyworld/``) lies at the top of the repository in a
checkout or an editable install, and inside the package (``erasure/_data``, mapped there by
pyproject.toml) in an installed wheel; :func:`resolve_path` finds a file among them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

PACKAGE_DATA = Path(__file__).resolve().parent / "_data"  # only in an installed wheel
INSTALLED = PACKAGE_DATA.is_dir()
SHIPPED_ROOT = PACKAGE_DATA if INSTALLED else PACKAGE_DATA.parent.parent  # holds recipes/ and checkpoints/toyworld/
REPOSITORY_ONLY = (Path("checkpoints") / "toyworld-v1", Path("checkpoints") / "toyworld-v2")  # shipped with the repository, not the wheel
TOYWORLD_MODEL = SHIPPED_ROOT / "checkpoints" / "toyworld" / "sd"
TOYWORLD_FLUX_MODEL = SHIPPED_ROOT / "checkpoints" / "toyworld" / "flux"
TOYWORLD_CLASSIFIER = SHIPPED_ROOT / "checkpoints" / "toyworld" / "classifier"
# model=<name> on the command line: the shipped models by name (any other value is a folder or hub id)
SHIPPED_MODELS = {"toyworld": "checkpoints/toyworld/sd", "toyworld-flux": "checkpoints/toyworld/flux",
                  "toyworld-v2": "checkpoints/toyworld-v2/sd", "toyworld-v1": "checkpoints/toyworld-v1/sd"}
PIPELINES = {cls.__name__: cls for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline, FluxPipeline)}
REQUIRED_COMPONENTS = {
    "StableDiffusionPipeline": ("tokenizer", "text_encoder", "unet", "vae", "scheduler"),
    "StableDiffusionXLPipeline": ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae",
                                  "scheduler"),
    "FluxPipeline": ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "transformer", "vae", "scheduler"),
}


class ModelLoadError(RuntimeError):
    """A model folder that is missing, incomplete or unreadable."""


def resolve_path(path: str | Path) -> Path:
    """A path from a config or a command line, such as ``recipes/esd.yaml`` or ``checkpoints/toyworld/sd``.

    Precedence: an absolute path as given; else the working directory, so a user's
    ``recipes/<name>.yaml`` or model folder there wins over the shipped one; else the shipped data
    (the repository's top-level folders in a checkout or an editable install, ``erasure/_data`` in an
    installed wheel). A path found in neither is returned as given, for the caller's error to name;
    a repository-only checkpoint (``checkpoints/toyworld-v1``) in an installed package is a
    :class:`ModelLoadError` saying so.
    """
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    shipped = SHIPPED_ROOT / path
    if shipped.exists():
        return shipped
    if INSTALLED and any(path.is_relative_to(folder) for folder in REPOSITORY_ONLY):
        raise ModelLoadError(f"{path} is in the repository only, not in the installed package; run from a clone of "
                             "the repository or use the shipped checkpoints/toyworld")
    return path


def check_model_folder(path: Path) -> str:
    """The pipeline class name of a diffusers folder; :class:`ModelLoadError` naming what is missing or unknown."""
    if not path.is_dir():
        raise ModelLoadError(
            f"model folder {path} does not exist; set model.path to a local Stable Diffusion diffusers folder "
            f"(the toy world's is {TOYWORLD_MODEL})"
        )
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")
    try:
        index = json.loads((path / "model_index.json").read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path / 'model_index.json'} is not valid JSON ({error}); re-export the model") from None
    kind = index.get("_class_name", "StableDiffusionPipeline")
    if kind not in REQUIRED_COMPONENTS:
        raise ModelLoadError(f"{path} holds a {kind}; erasure loads {', '.join(REQUIRED_COMPONENTS)} folders")
    missing = [c for c in REQUIRED_COMPONENTS[kind] if c not in index or not (path / c).is_dir()]
    if missing:
        raise ModelLoadError(f"model folder {path} is incomplete: missing {', '.join(missing)}; re-export the model")
    return kind


def is_hub_id(path: str | Path) -> bool:
    """A hub id such as "stable-diffusion-v1-5/stable-diffusion-v1-5": owner/name, not a local path."""
    text = str(path)
    try:
        local = Path(text).expanduser().exists()
    except (OSError, ValueError):
        return False
    return not local and text.count("/") == 1 and not text.startswith((".", "/", "~"))


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' loading progress bars off while a model loads (the console is the run's)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def load_pipeline(path: str | Path = TOYWORLD_MODEL, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32):
    """Load the pipeline of a local diffusers folder (SD-1.x/2.x, SDXL or FLUX, as its
    ``model_index.json`` says) or, when no such folder exists and the machine is online, of a hub id
    such as ``"stable-diffusion-v1-5/stable-diffusion-v1-5"`` (loaded as a Stable Diffusion pipeline).
    Weights are read from safetensors only; no safety checker or watermarker is loaded.
    """
    local = Path(path).expanduser()
    hub = is_hub_id(path)
    kind = "StableDiffusionPipeline" if hub else check_model_folder(local)
    extras = {"StableDiffusionPipeline": {"safety_checker": None, "feature_extractor": None,
                                          "requires_safety_checker": False},
              "StableDiffusionXLPipeline": {"add_watermarker": False}}.get(kind, {})
    try:
        with quiet_loading():
            pipeline = PIPELINES[kind].from_pretrained(
                str(local) if not hub else str(path), dtype=dtype, use_safetensors=True, **extras)
    except Exception as error:  # any failure to read the folder: one line naming the model and the cause
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"could not load the model at {path}: {first_line}") from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)

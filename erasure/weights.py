"""The result of a weight edit: a delta holding only the changed tensors.

``unet_delta.safetensors`` maps denoiser parameter names (as in ``unet.state_dict()``, or the FLUX
``transformer.state_dict()``) to their new values; a method that trains the text encoder adds its tensors as ``text_encoder.<name>``
(``<name>`` as in ``text_encoder.state_dict()``). Applying it to a freshly loaded base pipeline
gives the erased model exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from erasure.bundle import load_pipeline
from erasure.families import family_of
from erasure.io import atomic_directory, atomic_save_tensors

DELTA_FILE = "unet_delta.safetensors"
TEXT_ENCODER_PREFIX = "text_encoder."  # delta names of text-encoder tensors


class DeltaError(ValueError):
    """A delta file that is unreadable or does not fit the UNet it is applied to."""


def save_delta(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> new value) as safetensors, through a temporary file."""
    atomic_save_tensors(tensors, path, metadata)


def load_delta(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise DeltaError(f"cannot read the weight delta {path}: {error}; re-run the erasure or pass the right file") from None


@torch.no_grad()
def apply_delta(unet: torch.nn.Module, delta: dict[str, torch.Tensor] | Path,
                text_encoder: torch.nn.Module | None = None) -> None:
    """Overwrite the tensors named in ``delta`` with the delta's values: the UNet's, and the text
    encoder's (names ``text_encoder.<name>``; ``text_encoder`` is then required)."""
    if not isinstance(delta, dict):
        delta = load_delta(Path(delta))
    unet_state = unet.state_dict()
    text_encoder_state = text_encoder.state_dict() if text_encoder is not None else None
    for name, value in delta.items():
        state, key, owner = unet_state, name, "UNet"
        if name.startswith(TEXT_ENCODER_PREFIX):
            if text_encoder_state is None:
                raise DeltaError(f"the delta holds the text-encoder tensor {name!r}; apply it with the text encoder "
                                 "too (apply_delta(pipeline.unet, delta, pipeline.text_encoder))")
            state, key, owner = text_encoder_state, name.removeprefix(TEXT_ENCODER_PREFIX), "text encoder"
        if key not in state:
            raise DeltaError(f"the delta holds {name!r}, which this {owner} does not have; was it made for another model?")
        if state[key].shape != value.shape:
            raise DeltaError(f"the delta's {name!r} has shape {tuple(value.shape)} but the {owner}'s is "
                             f"{tuple(state[key].shape)}; was it made for another model?")
        state[key].copy_(value.to(state[key].dtype))


def export_pipeline(base: str | Path, delta_path: Path, output: Path) -> Path:
    """Save a full diffusers pipeline folder: the base model with the delta applied."""
    pipeline = load_pipeline(base)
    apply_delta(family_of(pipeline).denoiser, delta_path, pipeline.text_encoder)
    with atomic_directory(Path(output)) as folder:
        pipeline.save_pretrained(folder, safe_serialization=True)
        (folder / "erasure.json").write_text(json.dumps({"base": str(base), "delta": str(delta_path)}) + "\n")
    return Path(output)

"""The result of a weight edit: a UNet delta holding only the changed tensors.

``unet_delta.safetensors`` maps UNet parameter names (as in ``unet.state_dict()``) to their
new values. Applying it to a freshly loaded base pipeline gives the erased model exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors import SafetensorError
from safetensors.torch import load_file

from erasure.bundle import load_pipeline
from erasure.io import atomic_directory, atomic_save_tensors

DELTA_FILE = "unet_delta.safetensors"


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
def apply_delta(unet: torch.nn.Module, delta: dict[str, torch.Tensor] | Path) -> None:
    """Overwrite the UNet's tensors named in ``delta`` with the delta's values."""
    if not isinstance(delta, dict):
        delta = load_delta(Path(delta))
    state = unet.state_dict()
    for name, value in delta.items():
        if name not in state:
            raise DeltaError(f"the delta holds {name!r}, which this UNet does not have; was it made for another model?")
        if state[name].shape != value.shape:
            raise DeltaError(f"the delta's {name!r} has shape {tuple(value.shape)} but the UNet's is "
                             f"{tuple(state[name].shape)}; was it made for another model?")
        state[name].copy_(value.to(state[name].dtype))


def export_pipeline(base: str | Path, delta_path: Path, output: Path) -> Path:
    """Save a full diffusers pipeline folder: the base model with the delta applied."""
    pipeline: StableDiffusionPipeline = load_pipeline(base)
    apply_delta(pipeline.unet, delta_path)
    with atomic_directory(Path(output)) as folder:
        pipeline.save_pretrained(folder, safe_serialization=True)
        (folder / "erasure.json").write_text(json.dumps({"base": str(base), "delta": str(delta_path)}) + "\n")
    return Path(output)

"""Saving and loading the toy world's classifier (safetensors weights + JSON config)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from erasure.toyworld.architecture import ToyClassifier
from erasure.toyworld.world import ATTRIBUTES

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_classifier(classifier: ToyClassifier, folder: Path, extra: dict | None = None) -> None:
    folder = Path(folder)
    save_file(classifier.state_dict(), folder / WEIGHTS)
    config = {"architecture": "ToyClassifier", "width": classifier.width, "attributes": ATTRIBUTES,
              "input": "RGB 32x32 in [-1, 1]", **(extra or {})}
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_classifier(folder: str | Path) -> ToyClassifier:
    """Load the classifier saved by :func:`save_classifier`, in eval mode with frozen weights."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise FileNotFoundError(
            f"no toy-world classifier at {folder} (expected {WEIGHTS} and {CONFIG}); "
            "run `python -m erasure.toyworld.pretrain` to create it"
        )
    config = json.loads((folder / CONFIG).read_text())
    if config.get("attributes") != {k: list(v) for k, v in ATTRIBUTES.items()}:
        raise ValueError(f"classifier at {folder} was trained for other attributes: {config.get('attributes')}")
    classifier = ToyClassifier(width=config["width"])
    classifier.load_state_dict(load_file(folder / WEIGHTS))
    return classifier.eval().requires_grad_(False)


@torch.no_grad()
def predict(classifier: ToyClassifier, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Predicted class index per attribute for images in [-1, 1], shape (N, 3, 32, 32)."""
    return {name: logits.argmax(1) for name, logits in classifier(images).items()}

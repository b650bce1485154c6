"""Erase concepts from a text-to-image diffusion model.

    python -m erasure.train recipe=esd                         # erase "circle" from the toy world
    python -m erasure.train recipe=esd concept=star method.loss=hellinger
    python -m erasure.train recipe=esd protocol=artists concept="Van Gogh" model.path=/models/sd-v1-5 \\
        evaluation.prompts_csv=artists.csv evaluation.clip.checkpoint=/models/ViT-L-14.safetensors

Any config key is overridden as key=value. The run directory (output_dir) receives
config.yaml (every resolved value, and under `sources` the layer it came from), erased/ (the
weight delta or LoRA folder), metrics.json, samples/, report.md, logs/ and checkpoints/
(continue an interrupted run with resume=true output_dir=<run dir>).
"""

from __future__ import annotations

import sys

from erasure.cli import run_command
from erasure.config import available_presets, available_recipes, load_config
from erasure.runs import Interrupted, TrainingStopped, train
from evaluation.protocols import PROTOCOLS

MAIN_KEYS = [
    ("recipe", "which recipe (required)"),
    ("concept", "concept(s) to erase: concept=star or concept=[circle,star]"),
    ("protocol", "benchmark: " + " | ".join(PROTOCOLS) + " (default toyworld)"),
    ("method.*", "the method's options, e.g. method.train_method=esd-u method.loss=hellinger method.eta=1.0"),
    ("trainer.max_steps", "training steps"),
    ("trainer.logger", "csv (default) | tensorboard | wandb | mlflow"),
    ("model.path", "a local Stable Diffusion diffusers folder (default: the embedded toy world)"),
    ("model.preset", "published hyperparameters: auto (detected) | " + " | ".join(available_presets()) + " | none"),
    ("output_dir", "run directory (default runs/<recipe>/<time>)"),
    ("resume", "true: continue the run in output_dir from its last checkpoint"),
    ("overwrite", "true: replace an existing output_dir"),
    ("evaluation.*", "steps, guidance, images_per_prompt, evaluator, *_csv prompt files, enabled"),
    ("seed", "random seed (same seed, same images, same metrics)"),
]


def usage() -> str:
    keys = "\n".join(f"  {key:<20} {text}" for key, text in MAIN_KEYS)
    protocols = "\n".join(f"  {name:<20} {protocol.summary}" for name, protocol in PROTOCOLS.items())
    return (f"{__doc__}\nrecipes: {', '.join(available_recipes())}\n\nprotocols:\n{protocols}\n\n"
            f"main keys:\n{keys}\n")


def main(argv: list[str] | None = None) -> int:
    return run_command(usage(), lambda arguments: train(load_config(arguments)), argv,
                       {TrainingStopped: (1, "error"), Interrupted: (143, "stopped")})


if __name__ == "__main__":
    sys.exit(main())

"""Erase concepts from a text-to-image diffusion model.

    python -m erasure.train recipe=esd                         # erase "circle" from the toy world
    python -m erasure.train recipe=esd concept=star method.loss=hellinger
    python -m erasure.train recipe=esd protocol=artists concept="Van Gogh" model.path=/models/sd-v1-5 \\
        evaluation.prompts_csv=artists.csv evaluation.clip.checkpoint=/models/ViT-L-14.safetensors

Any config key is overridden as key=value; -m (--multirun) sweeps keys through Hydra's sweepers and
launchers (``erasure.multirun``):

    python -m erasure.train -m recipe=esd method.lr=1e-4,5e-4,1e-3 hydra/launcher=submitit_local
    python -m erasure.train -m recipe=esd hydra/sweeper=optuna hydra.sweeper.n_trials=8 \\
        "method.lr=tag(log,interval(1e-4,3e-3))" "method.eta=interval(0.5,2)"

 The run directory (output_dir) receives
config.yaml (every resolved value, and under `sources` the layer it came from), erased/ (the
weight delta or LoRA folder), metrics.json, samples/, report.md, logs/ and checkpoints/
(continue an interrupted run with resume=true output_dir=<run dir>).
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from erasure.cli import run_command
from erasure.config import ConfigError, available_presets, available_recipes, load_config
from erasure.multirun import SweepFailed, choices, multirun
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
    ("--cfg job", "print the resolved config (every value and the layer it came from); nothing runs"),
    ("-m", "multirun: sweep keys (a,b / range() / interval()) through Hydra's sweepers and launchers"),
]


def usage() -> str:
    keys = "\n".join(f"  {key:<20} {text}" for key, text in MAIN_KEYS)
    protocols = "\n".join(f"  {name:<20} {protocol.summary}" for name, protocol in PROTOCOLS.items())
    return (f"{__doc__}\nrecipes: {', '.join(available_recipes())}\n\nprotocols:\n{protocols}\n\n"
            f"main keys:\n{keys}\n\nmultirun (-m): hydra/launcher={' | '.join(choices('hydra/launcher'))}; "
            f"hydra/sweeper={' | '.join(choices('hydra/sweeper'))}\n")


MULTIRUN = ("-m", "--multirun")


def run(arguments: list[str]) -> None:
    """One run; with -m a multirun; with ``--cfg job`` the resolved config, printed (nothing is run or written)."""
    if "--cfg" in arguments:
        at = arguments.index("--cfg")
        if arguments[at + 1:at + 2] != ["job"]:
            raise ConfigError("--cfg takes job (the run's resolved config), e.g. python -m erasure.train recipe=esd --cfg job")
        print(OmegaConf.to_yaml(load_config(arguments[:at] + arguments[at + 2:])), end="")
    elif any(a in MULTIRUN for a in arguments):
        multirun([a for a in arguments if a not in MULTIRUN])
    else:
        train(load_config(arguments))


def main(argv: list[str] | None = None) -> int:
    return run_command(usage(), run, argv,
                       {TrainingStopped: (1, "error"), Interrupted: (143, "stopped"), SweepFailed: (1, "error")})


if __name__ == "__main__":
    sys.exit(main())

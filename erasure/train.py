"""Erase concepts from a text-to-image diffusion model.

    python -m erasure.train recipe=esd                         # erase "circle" from the toy world
    python -m erasure.train recipe=esd concept=star method.loss=hellinger
    python -m erasure.train recipe=esd model.path=/models/stable-diffusion-v1-5 concept="Van Gogh"

Any config key is overridden as key=value. The run directory (output_dir) receives
config.yaml, erased/ (the weight delta), metrics.json, samples/, report.md, logs/ and
checkpoints/ (continue an interrupted run with resume=true output_dir=<run dir>).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from erasure.bundle import ModelLoadError, load_pipeline
from erasure.config import ConfigError, available_recipes, load_config, resolve_path
from erasure.generation import Sampler
from erasure.io import atomic_write_text
from erasure.methods import METHODS
from evaluation.callback import EvaluationCallback
from evaluation.evaluators import ToyWorldEvaluator
from evaluation.suites import load_csv, toyworld_suites

MAIN_KEYS = [
    ("recipe", "which recipe (required)"),
    ("concept", "concept(s) to erase: concept=star or concept=[circle,star]"),
    ("method.*", "the method's options, e.g. method.train_method=esd-u method.loss=hellinger method.eta=1.0"),
    ("trainer.max_steps", "training steps"),
    ("model.path", "a local Stable Diffusion diffusers folder (default: the embedded toy world)"),
    ("output_dir", "run directory (default runs/<recipe>/<time>)"),
    ("resume", "true: continue the run in output_dir from its last checkpoint"),
    ("overwrite", "true: replace an existing output_dir"),
    ("evaluation.*", "protocol: steps, guidance, images_per_prompt, *_csv prompt files, enabled"),
    ("seed", "random seed (same seed, same images, same metrics)"),
]


def usage() -> str:
    keys = "\n".join(f"  {key:<20} {text}" for key, text in MAIN_KEYS)
    return f"{__doc__}\nrecipes: {', '.join(available_recipes())}\n\nmain keys:\n{keys}\n"


def check_output_dir(config: DictConfig) -> Path:
    """Refuse an output_dir that would be clobbered or cannot be resumed; writes nothing."""
    output = Path(config.output_dir)
    if config.resume:
        if not (output / "checkpoints" / "last.ckpt").exists():
            raise ConfigError(f"resume=true but {output} has no checkpoints/last.ckpt; pass the run directory to continue")
    elif output.exists() and any(output.iterdir()) and not config.overwrite:
        raise ConfigError(f"output_dir {output} already exists; pass overwrite=true to replace it or resume=true to continue it")
    return output


def create_output_dir(config: DictConfig, output: Path) -> None:
    if output.exists() and not config.resume and config.overwrite:
        shutil.rmtree(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create output_dir {output}: {error.strerror}; choose a writable output_dir") from None


def build_evaluation(config: DictConfig, output: Path, run_info: dict) -> EvaluationCallback:
    evaluation = config.evaluation
    if evaluation.evaluator != "toyworld":
        raise ConfigError(f"unknown evaluator '{evaluation.evaluator}'; available: toyworld")
    suites = toyworld_suites(config.concept, seed=config.seed)
    for suite in ("target", "synonym", "retained"):
        csv_path = evaluation.get(f"{suite}_csv")
        if csv_path:
            suites[suite] = load_csv(resolve_path(csv_path))
    return EvaluationCallback(
        suites, ToyWorldEvaluator(resolve_path(evaluation.classifier)),
        Sampler(steps=evaluation.steps, guidance=evaluation.guidance), output, run_info,
        images_per_prompt=evaluation.images_per_prompt, every_n_steps=evaluation.every_n_steps,
        batch_size=evaluation.batch_size, kid_subset_size=evaluation.kid_subset_size,
    )


def run(config: DictConfig) -> Path:
    """Train (or edit) and evaluate; returns the run directory."""
    output = check_output_dir(config)
    L.seed_everything(config.seed, verbose=False)
    pipeline = load_pipeline(resolve_path(config.model.path))
    method = METHODS[config.method.name]
    module = method(pipeline, OmegaConf.to_object(config.method), list(config.concept), seed=config.seed,
                    resolution=config.model.resolution)
    run_info = {"recipe": config.recipe, "method": config.method.name, "model": str(config.model.path),
                "erase": list(config.concept)}
    evaluation = build_evaluation(config, output, run_info) if config.evaluation.enabled else None
    create_output_dir(config, output)
    atomic_write_text(output / "config.yaml", OmegaConf.to_yaml(config))
    callbacks = [
        ModelCheckpoint(dirpath=output / "checkpoints", save_last=True, save_top_k=0,
                        every_n_train_steps=config.trainer.checkpoint_every_n_steps),
        TQDMProgressBar(refresh_rate=5),
    ]
    if evaluation is not None:
        callbacks.append(evaluation)
    trainer = L.Trainer(
        max_steps=config.trainer.max_steps, max_epochs=-1, accelerator=config.trainer.accelerator,
        devices=config.trainer.devices, strategy=config.trainer.strategy, precision=config.trainer.precision,
        logger=CSVLogger(output, name="logs", version=""), callbacks=callbacks, default_root_dir=output,
        log_every_n_steps=config.trainer.log_every_n_steps, enable_model_summary=False, num_sanity_val_steps=0,
    )
    last = output / "checkpoints" / "last.ckpt"
    started = time.perf_counter()
    trainer.fit(module, ckpt_path=str(last) if config.resume else None, weights_only=True)
    module.save_erased(output / "erased", metadata={"base": config.model.path})
    print(f"erased {', '.join(config.concept)} with {config.recipe} in {time.perf_counter() - started:.1f} s -> {output}")
    return output


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if not arguments or any(a in ("-h", "--help", "help") for a in arguments):
        print(usage())
        return 0 if arguments else 2
    try:
        config = load_config(arguments)
        run(config)
    except (ConfigError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

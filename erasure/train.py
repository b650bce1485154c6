"""Erase concepts from a text-to-image diffusion model.

    python -m erasure.train recipe=esd                         # erase "circle" from the toy world
    python -m erasure.train recipe=esd concept=star method.loss=hellinger
    python -m erasure.train recipe=esd model.path=/models/stable-diffusion-v1-5 concept="Van Gogh"

Any config key is overridden as key=value. The run directory (output_dir) receives
config.yaml, erased/ (the weight delta), metrics.json, samples/, report.md, logs/ and
checkpoints/ (continue an interrupted run with resume=true output_dir=<run dir>).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from erasure.cli import run_command
from erasure.config import ConfigError, available_recipes, load_config, resolve_path
from erasure.generation import Sampler
from erasure.io import atomic_save, atomic_write_text
from erasure.runs import build_module
from evaluation.callback import EvaluationCallback
from evaluation.evaluators import (
    EVALUATORS, CLIPEvaluator, Evaluator, EvaluatorError, NudeNetEvaluator, ToyWorldEvaluator, TorchvisionEvaluator,
)
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


class TrainingStopped(RuntimeError):
    """Training ended early (a non-finite loss); the run directory holds the last good weights."""


class Interrupted(RuntimeError):
    """SIGTERM: the run stopped after a step and left a checkpoint to resume from."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed: an interrupted save never leaves half a file."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_save(Path(path), lambda staging: super(AtomicCheckpointIO, self).save_checkpoint(
            checkpoint, staging, storage_options))


class CheckpointOnInterrupt(L.Callback):
    """Ctrl-C (SIGINT) or SIGTERM: save checkpoints/last.ckpt so that ``resume=true`` continues the run."""

    def __init__(self, output: Path):
        self.output = output

    def on_exception(self, trainer: L.Trainer, module, exception: BaseException) -> None:
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            trainer.save_checkpoint(self.output / "checkpoints" / "last.ckpt")
            if trainer.is_global_zero:
                print(f"\ninterrupted at step {trainer.global_step}; checkpoint saved: continue with resume=true "
                      f"output_dir={self.output}", file=sys.stderr)


def is_ddp_worker() -> bool:
    """A process Lightning's DDP launcher started for another rank: the run directory is rank 0's."""
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0


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


def check_concepts(tokenizer, concepts: list[str]) -> None:
    """Each concept must encode to known tokens and fit the text encoder's context."""
    room = tokenizer.model_max_length - 2  # begin and end tokens
    for concept in concepts:
        ids = tokenizer(concept, add_special_tokens=False).input_ids
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids and tokenizer.unk_token not in concept:
            raise ConfigError(f"the model's tokenizer cannot encode concept '{concept}' (unknown tokens); "
                              "spell it with characters the tokenizer knows")
        if len(ids) > room:
            raise ConfigError(f"concept '{concept[:30]}...' is {len(ids)} tokens but the text encoder reads {room}; "
                              "use a shorter concept")


def build_evaluator(evaluation: DictConfig) -> Evaluator:
    """The configured evaluator; a missing or wrong model is a one-line ConfigError."""
    name = evaluation.evaluator
    try:
        if name == "toyworld":
            return ToyWorldEvaluator(resolve_path(evaluation.classifier))
        if name in ("clip", "nudenet", "torchvision"):
            section = OmegaConf.to_object(evaluation[name])
            return {"clip": CLIPEvaluator, "nudenet": NudeNetEvaluator, "torchvision": TorchvisionEvaluator}[name](section)
    except EvaluatorError as error:
        raise ConfigError(str(error)) from None
    raise ConfigError(f"unknown evaluator '{name}' for evaluation.evaluator; available: {', '.join(EVALUATORS)}")


def build_evaluation(config: DictConfig, output: Path, run_info: dict) -> EvaluationCallback:
    evaluation = config.evaluation
    suites = toyworld_suites(config.concept, seed=config.seed)
    for suite in ("target", "synonym", "retained"):
        csv_path = evaluation.get(f"{suite}_csv")
        if csv_path:
            suites[suite] = load_csv(resolve_path(csv_path))
    return EvaluationCallback(
        suites, build_evaluator(evaluation),
        Sampler(steps=evaluation.steps, guidance=evaluation.guidance), output, run_info,
        images_per_prompt=evaluation.images_per_prompt, every_n_steps=evaluation.every_n_steps,
        batch_size=evaluation.batch_size, kid_subset_size=evaluation.kid_subset_size,
    )


def run(config: DictConfig) -> Path:
    """Train (or edit) and evaluate; returns the run directory."""
    worker = is_ddp_worker()
    output = Path(config.output_dir) if worker else check_output_dir(config)
    L.seed_everything(config.seed, verbose=False)
    module = build_module(config)
    check_concepts(module.pipeline.tokenizer, config.concept)
    run_info = {"recipe": config.recipe, "method": config.method.name, "model": str(config.model.path),
                "erase": list(config.concept)}
    evaluation = build_evaluation(config, output, run_info) if config.evaluation.enabled else None
    if not worker:
        create_output_dir(config, output)
        atomic_write_text(output / "config.yaml", OmegaConf.to_yaml(config))
        if config.trainer.devices != 1:  # Lightning's DDP launcher re-runs this command line for the other ranks
            sys.argv.append(f"output_dir={output}")
    callbacks = [
        CheckpointOnInterrupt(output),
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
        plugins=[AtomicCheckpointIO()],
    )
    last = output / "checkpoints" / "last.ckpt"
    started = time.perf_counter()
    try:
        trainer.fit(module, ckpt_path=str(last) if config.resume else None, weights_only=True)
    except SIGTERMException:
        raise Interrupted(f"terminated at step {trainer.global_step}; continue with resume=true output_dir={output}") from None
    if not trainer.is_global_zero:
        return output
    module.save_erased(output / "erased", metadata={"base": config.model.path})
    if module.nonfinite_step is not None:
        raise TrainingStopped(f"the loss was not finite at step {module.nonfinite_step}: training stopped, and "
                              f"{output / 'erased'} holds the weights before it; lower method.lr or check the inputs")
    print(f"erased {', '.join(config.concept)} with {config.recipe} in {time.perf_counter() - started:.1f} s -> {output}")
    return output


def main(argv: list[str] | None = None) -> int:
    return run_command(usage(), lambda arguments: run(load_config(arguments)), argv,
                       {TrainingStopped: (1, "error"), Interrupted: (143, "stopped")})


if __name__ == "__main__":
    sys.exit(main())

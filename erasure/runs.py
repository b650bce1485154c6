"""The run layer: one place that assembles a run, for the three command-line entry points.

    config -> model (pipeline) -> method module -> protocol -> evaluator -> callbacks -> Trainer

    output = train(load_config(["recipe=esd", "concept=star"]))   # erase and evaluate: a run directory
    run = load_run(output)                                          # restore it: the erased model
    images = run.module.generate(["a star"], [0], Sampler())
    results = attack_run(output, ["inversion"], AttackConfig())     # attack it

A restored run is the method's module with the saved result (weight delta, LoRA folder or
instruction rule) loaded on top of the base model named in its ``config.yaml``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from erasure.bundle import load_pipeline
from erasure.config import ConfigError, load_run_config, resolve_path
from erasure.generation import Sampler
from erasure.io import atomic_save, atomic_write_text
from erasure.loggers import build_logger
from erasure.methods import METHODS
from erasure.methods.base import EraserModule
from erasure.methods.rece import Validation
from evaluation.attacks import AttackConfig, Target, budget, measure_attack
from evaluation.report import results_table
from evaluation.callback import EvaluationCallback
from evaluation.evaluators import Evaluator, EvaluatorError
from evaluation.protocols import build_evaluator, build_scorer, get_protocol
from evaluation.report import comparison_grid
from evaluation.suites import load_csv

log = logging.getLogger(__name__)
info, warn = rank_zero_only(log.info), rank_zero_only(log.warning)  # the run layer: one message per run, not per rank

RUN_DIR_ENV = "ERASURE_RUN_DIR"  # the run directory, for the processes Lightning's DDP launcher starts


class TrainingStopped(RuntimeError):
    """Training ended early (a non-finite loss); the run directory holds the last good weights."""


class Interrupted(RuntimeError):
    """SIGTERM: the run stopped after a step and left a checkpoint to resume from."""


# ----- assembling a run ---------------------------------------------------------------------
def build_module(config: DictConfig, pipeline=None) -> EraserModule:
    """The method module of a validated run config, on the config's model unless one is given."""
    pipeline = pipeline or load_pipeline(resolve_path(config.model.path))
    method = METHODS[config.method.name]
    module = method(pipeline, OmegaConf.to_object(config.method), list(config.concept), seed=config.seed,
                    resolution=config.model.resolution)
    if config.model.gradient_checkpointing:
        module.denoiser.enable_gradient_checkpointing()
    return module


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


def evaluator_of(evaluation: DictConfig) -> Evaluator | None:
    """The configured evaluator; a missing or wrong model is a one-line ConfigError."""
    try:
        return build_evaluator(evaluation, resolve_path)
    except EvaluatorError as error:
        raise ConfigError(str(error)) from None


def attach_validation(module: EraserModule, config: DictConfig) -> None:
    """Give ``module.validation`` its judge: the protocol's validation suite (never the evaluation's own
    prompts and seeds), generated with the evaluation's sampler and judged by its evaluator."""
    judge = evaluator_of(config.evaluation)
    rows = get_protocol(config.protocol).validation_suite(list(config.concept), config.evaluation, config.seed)
    if judge is not None and rows:
        module.validation = Validation([r.prompt for r in rows], [r.evaluation_seed for r in rows],
                                       [r.concept for r in rows], judge,
                                       Sampler(steps=config.evaluation.steps, guidance=config.evaluation.guidance))


def build_evaluation(config: DictConfig, output: Path, run_info: dict) -> EvaluationCallback:
    evaluation = config.evaluation
    suites = get_protocol(config.protocol).suites(list(config.concept), evaluation, config.seed)
    evaluator = evaluator_of(evaluation)
    try:
        scorer = build_scorer(evaluation, evaluator, resolve_path)
    except EvaluatorError as error:
        raise ConfigError(str(error)) from None
    if evaluator is None:
        warn(f"protocol {config.protocol}: no evaluator (evaluation.evaluator=none): images and reports only; "
             "set evaluation.evaluator=clip|nudenet|torchvision with its weights for accuracies")
    return EvaluationCallback(
        suites, evaluator, Sampler(steps=evaluation.steps, guidance=evaluation.guidance), output, run_info,
        images_per_prompt=evaluation.images_per_prompt, every_n_steps=evaluation.every_n_steps,
        batch_size=evaluation.batch_size, kid_subset_size=evaluation.kid_subset_size, scorer=scorer,
    )


# ----- the run directory ----------------------------------------------------------------------
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed: an interrupted save never leaves half a file.
    ``torch.save`` writes into the file tensor by tensor; Lightning's own save first serialises the whole
    checkpoint into memory and copies it once more (at real sizes, twice the trained tensors and their Adam
    states on top of the run)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_save(Path(path), lambda staging: torch.save(checkpoint, staging))


class StepInBackward(L.Callback):
    """Adam's update of each trained tensor made as soon as its gradient is complete, during the backward
    pass, and the gradient freed at once (PyTorch's "fusing the optimizer step into the backward pass"):
    a step holds one tensor's gradient instead of all of them, a full-UNet run's gradients (3 GiB on
    SD-1.5) never exist together.

    The update is the optimizer's own, from its own state (one optimizer, one ``state_dict``: checkpoints
    resume either way); Lightning's step that follows finds no gradient and does nothing. It applies where
    that gives Lightning's update exactly: one optimizer, one process, automatic optimisation, no gradient
    clipping, no gradient scaler; elsewhere the callback leaves the step to Lightning
    (``trainer.step_in_backward=false`` always does)."""

    def __init__(self) -> None:
        self.handles: list = []

    @staticmethod
    def applies(trainer: L.Trainer, module: EraserModule) -> bool:
        return (module.automatic_optimization and len(trainer.optimizers) == 1 and trainer.world_size == 1
                and trainer.accumulate_grad_batches == 1 and trainer.gradient_clip_val is None
                and getattr(trainer.precision_plugin, "scaler", None) is None)

    def on_train_start(self, trainer: L.Trainer, module: EraserModule) -> None:
        if not self.applies(trainer, module):
            return
        optimizer = trainer.optimizers[0]
        group_of = {parameter: group for group in optimizer.param_groups for parameter in group["params"]}

        def step(parameter: torch.Tensor) -> None:
            groups = optimizer.param_groups
            optimizer.param_groups = [{**group_of[parameter], "params": [parameter]}]  # this tensor alone
            try:
                optimizer.step()
            finally:
                optimizer.param_groups = groups
            parameter.grad = None

        self.handles = [parameter.register_post_accumulate_grad_hook(step) for parameter in group_of]

    def on_train_end(self, trainer: L.Trainer, module: EraserModule) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class CheckpointOnInterrupt(OnExceptionCheckpoint):
    """Lightning's exception checkpoint as ``checkpoints/last.ckpt``, with the command that resumes it."""

    def __init__(self, output: Path):
        super().__init__(dirpath=output / "checkpoints", filename="last")
        self.output = output

    def on_exception(self, trainer: L.Trainer, module, exception: BaseException) -> None:
        super().on_exception(trainer, module, exception)
        if trainer.is_global_zero and isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            log.warning(f"\ninterrupted at step {trainer.global_step}; checkpoint saved: continue with resume=true "
                        f"output_dir={self.output}")

    def teardown(self, trainer: L.Trainer, *args, **kwargs) -> None:
        """Keep the file: last.ckpt is also ModelCheckpoint's (the parent removes its file after a clean fit)."""


# ----- training ---------------------------------------------------------------------------------
def train(config: DictConfig) -> Path:
    """Train (or edit) and evaluate; returns the run directory."""
    worker = is_ddp_worker()
    output = Path(os.environ.get(RUN_DIR_ENV, config.output_dir)) if worker else check_output_dir(config)
    L.seed_everything(config.seed, verbose=False)
    module = build_module(config)
    check_concepts(module.pipeline.tokenizer, config.concept)
    if hasattr(module, "validation") and config.evaluation.enabled:  # a method that selects with a judge (RECE)
        attach_validation(module, config)
    run_info = {"recipe": config.recipe, "method": config.method.name, "model": str(config.model.path),
                "protocol": config.protocol, "erase": list(config.concept)}
    evaluation = build_evaluation(config, output, run_info) if config.evaluation.enabled else None
    if not worker:
        create_output_dir(config, output)
        atomic_write_text(output / "config.yaml", OmegaConf.to_yaml(config))
        os.environ[RUN_DIR_ENV] = str(output)  # Lightning's DDP launcher re-runs the command for the other ranks
    callbacks = [
        CheckpointOnInterrupt(output),
        ModelCheckpoint(dirpath=output / "checkpoints", save_last=True, save_top_k=0,
                        every_n_train_steps=config.trainer.checkpoint_every_n_steps),
        TQDMProgressBar(refresh_rate=5),
        *([StepInBackward()] if config.trainer.step_in_backward else []),
    ]
    if evaluation is not None:
        callbacks.append(evaluation)
    trainer = L.Trainer(
        max_steps=config.trainer.max_steps, max_epochs=-1, accelerator=config.trainer.accelerator,
        devices=config.trainer.devices, num_nodes=config.trainer.num_nodes, strategy=config.trainer.strategy,
        precision=config.trainer.precision,
        logger=build_logger(config.trainer.logger, output), callbacks=callbacks, default_root_dir=output,
        log_every_n_steps=config.trainer.log_every_n_steps, enable_model_summary=False, num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()], gradient_clip_val=module.gradient_clip_val(),
    )
    last = output / "checkpoints" / "last.ckpt"
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():  # with an exception checkpoint registered, Lightning reads ckpt_path=None
            # as "last" and warns twice that there is none: a fresh run's new directory has none by construction
            warnings.filterwarnings("ignore", message=r".*ckpt_path=None\)` was called without a model")
            warnings.filterwarnings("ignore", message=r".*is set, but there is no last checkpoint available")
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")  # the frozen parts, by design
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")  # Lightning's own
            trainer.fit(module, ckpt_path=str(last) if config.resume else None, weights_only=True)
    except SIGTERMException:
        raise Interrupted(f"terminated at step {trainer.global_step}; continue with resume=true output_dir={output}") from None
    if not trainer.is_global_zero:
        return output
    module.save_erased(output / "erased", metadata={"base": config.model.path})
    if module.nonfinite_step is not None:
        raise TrainingStopped(f"the loss was not finite at step {module.nonfinite_step}: training stopped, and "
                              f"{output / 'erased'} holds the weights before it; lower method.lr or check the inputs")
    info(f"erased {', '.join(config.concept)} with {config.recipe} in {time.perf_counter() - started:.1f} s -> {output}")
    if (output / "metrics.json").is_file():
        info(results_table(json.loads((output / "metrics.json").read_text())))
        info(f"report: {output / 'report.md'}")
    return output


# ----- finished runs ------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    config: DictConfig
    metrics: dict
    module: EraserModule

    @property
    def name(self) -> str:
        return self.path.name


def load_run(run_dir: str | Path) -> Run:
    """Restore a finished run: its config, its metrics and its erased model."""
    path = Path(run_dir)
    config = load_run_config(path)
    metrics_path = path / "metrics.json"
    if not metrics_path.is_file():
        raise ConfigError(f"{path} has no metrics.json (the run did not finish); resume it with "
                          f"python -m erasure.train recipe={config.recipe} resume=true output_dir={path}")
    try:
        metrics = json.loads(metrics_path.read_text())
    except (ValueError, OSError) as error:
        raise ConfigError(f"{metrics_path} is not readable JSON ({error}); re-run the erasure") from None
    module = build_module(config)
    module.load_erased(path / "erased")
    return Run(path, config, metrics, module)


def attack_run(run_dir: Path, attacks: list[str], config: AttackConfig) -> dict[str, dict]:
    """Run each attack on a fresh copy of the run's erased model; results are cached in <run>/attacks/."""
    results = {}
    starts: dict[str, torch.Tensor] = {}  # the original and unattacked images, made once for every attack
    for attack in attacks:
        path = Path(run_dir) / "attacks" / f"{attack}.json"
        if path.exists() and json.loads(path.read_text())["budget"] == budget(attack, config):
            results[attack] = json.loads(path.read_text())
            continue
        run = load_run(run_dir)
        evaluation = run.config.evaluation
        evaluator = evaluator_of(evaluation)
        if evaluator is None:
            raise ConfigError(f"{run.path} was evaluated without an evaluator; attacks need one to count successes "
                              "(re-run it with evaluation.evaluator=...)")
        rows = load_csv(run.path / "prompts" / "target.csv")
        retained = run.path / "prompts" / "retained.csv"  # concepts the method kept: relearn's controls
        controls = list(dict.fromkeys(r.concept for r in load_csv(retained))) if retained.is_file() else []
        target = Target(run.module, rows, Sampler(steps=evaluation.steps, guidance=evaluation.guidance),
                        evaluation.images_per_prompt, evaluator, get_protocol(run.config.protocol).concept_word,
                        controls, run.config.protocol, starts)
        started = time.perf_counter()
        outcome = measure_attack(attack, target, config)
        fields = dict(outcome.fields)
        success = {k: fields.pop(k) for k in ("attack_success_rate", "attack_success_rate_ci95")}
        result = {
            "attack": attack, "run": str(run.path), "method": run.config.method.name, **success,
            "target_acc_unattacked": run.metrics["after"].get("efficacy/target_acc"),
            "target_acc_original": run.metrics["before"].get("efficacy/target_acc"),
            "budget": budget(attack, config), "seconds": round(time.perf_counter() - started, 1), **fields,
        }
        if fields.get("attacked_images"):
            result["seconds_per_attacked_image"] = round(result["seconds"] / fields["attacked_images"], 2)
        per_prompt = target.images_per_prompt
        unattacked = target.unattacked_images()
        images, prompts = outcome.images, outcome.prompts
        comparison_grid(prompts[::per_prompt], unattacked, images, per_prompt, path.with_suffix(".png"),
                        titles=("erased, plain prompt", "erased, attacked prompt"))
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        results[attack] = result
    return results

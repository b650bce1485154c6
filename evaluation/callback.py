"""The shared evaluation: one Lightning callback scores every method on the same prompts and seeds.

At fit start it generates the suites with the original model ("before"), at fit end with the
erased model ("after"), and optionally every N steps (logged only). It logs the metrics
through the Lightning logger and writes ``metrics.json``, ``samples/*.png`` and ``report.md``
into the run directory. The evaluator never influences training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch

from erasure.generation import Sampler
from erasure.io import atomic_write_text
from erasure.loggers import log_image
from evaluation.evaluators import Evaluator, has_features
from evaluation.metrics import (
    CLIP_SCORE, HARMONIC_MEAN, KEPT_SUITES, KID, SUITE_METRICS, accuracy_with_interval, harmonic_mean, kid,
)
from evaluation.report import comparison_grid, write_report
from evaluation.suites import Prompt, write_csv


def scalars(prefix: str, metrics: dict) -> dict[str, float]:
    """The numbers of ``metrics`` as ``<prefix>/<name>`` for the loggers (intervals stay in metrics.json)."""
    return {f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class EvaluationCallback(L.Callback):
    """``evaluator`` decides whether an image shows a concept (None: images and reports only);
    ``scorer`` gives the CLIP score (None: no CLIP score)."""

    def __init__(self, suites: dict[str, list[Prompt]], evaluator: Evaluator | None, sampler: Sampler,
                 output_dir: Path, run_info: dict, images_per_prompt: int = 3, every_n_steps: int = 0,
                 batch_size: int = 64, kid_subset_size: int = 50, scorer: Evaluator | None = None):
        self.suites, self.evaluator, self.sampler, self.scorer = suites, evaluator, sampler, scorer
        self.output_dir, self.run_info = Path(output_dir), run_info
        self.images_per_prompt, self.every_n_steps = images_per_prompt, every_n_steps
        self.batch_size, self.kid_subset_size = batch_size, kid_subset_size
        self.original_images: dict[str, torch.Tensor] = {}
        self.before: dict[str, float] = {}
        self.eval_seconds = 0.0
        self.fit_started = 0.0
        self.paused = 0.0  # seconds of the fit spent in periodic evaluations
        self.history: list[dict] = []  # every evaluation after the start: step, training seconds, metrics

    # ----- generation and scoring -----------------------------------------------------------
    def _rows(self, suite: str) -> tuple[list[str], list[int], list[str]]:
        prompts, seeds, concepts = [], [], []
        for row in self.suites[suite]:
            for k in range(self.images_per_prompt):
                prompts.append(row.prompt)
                seeds.append(row.evaluation_seed + k)
                concepts.append(row.concept)
        return prompts, seeds, concepts

    def _generate(self, trainer: L.Trainer, module, original: bool) -> dict[str, torch.Tensor]:
        """Every suite's images. Under DDP the batches are dealt out to the ranks and gathered, and
        each image is made in the same batch as in one process, so the images are identical."""
        rank, world_size = trainer.global_rank, trainer.world_size
        images = {}
        for suite in self.suites:
            prompts, seeds, _ = self._rows(suite)
            starts = list(range(0, len(prompts), self.batch_size))
            mine = {start: module.generate(prompts[start:start + self.batch_size], seeds[start:start + self.batch_size],
                                           self.sampler, original=original, batch_size=self.batch_size)
                    for start in starts[rank::world_size]}
            if world_size > 1:
                gathered: list[dict] = [{} for _ in range(world_size)]
                torch.distributed.all_gather_object(gathered, mine)
                mine = {start: batch for part in gathered for start, batch in part.items()}
            images[suite] = torch.cat([mine[start] for start in starts])
        return images

    def score(self, images: dict[str, torch.Tensor]) -> dict[str, float | list[float]]:
        """Accuracies with their 95% intervals, per concept for the target and retained suites where they
        name several, the evaluator's own details (NudeNet's per-class counts), CLIP score and KID."""
        metrics: dict = {}
        evaluator = self.evaluator
        for suite, name in SUITE_METRICS.items():
            if suite in images and evaluator is not None:
                concepts = self._rows(suite)[2]
                metrics.update(accuracy_with_interval(evaluator, images[suite], concepts, name))
                if suite in ("target", "retained") and len(set(concepts)) > 1:  # per erased / retained concept
                    for concept in dict.fromkeys(concepts):
                        rows = [i for i, c in enumerate(concepts) if c == concept]
                        metrics.update(accuracy_with_interval(evaluator, images[suite][rows], [concept] * len(rows),
                                                              f"{name}/{concept}"))
                if suite == "target" and hasattr(evaluator, "details"):
                    metrics.update({f"{name}/{k}": v for k, v in evaluator.details(images[suite]).items()})
        kept = [suite for suite in KEPT_SUITES if suite in images]
        if evaluator is not None and "target" in images and {"neighbour", "distant"} & set(images):  # mass: MACE's H
            seen = sum(round(metrics[SUITE_METRICS[suite]] * len(images[suite])) for suite in kept)  # image counts
            specificity = seen / sum(len(images[suite]) for suite in kept)
            erased = [1 - metrics[SUITE_METRICS[suite]] for suite in ("target", "synonym") if suite in images]
            metrics[HARMONIC_MEAN] = round(harmonic_mean([*erased, specificity]), 4)
        # fidelity: the unlabelled fidelity suite when there is one, else the kept images
        fidelity = next((s for s in ("fidelity", *KEPT_SUITES) if s in images), None)
        if fidelity and self.scorer is not None:
            prompts = self._rows(fidelity)[0]
            metrics[CLIP_SCORE] = round(float(self.scorer.score(images[fidelity], prompts).mean()), 3)
        if fidelity and evaluator is not None and has_features(evaluator):
            metrics[KID] = round(kid(evaluator, self.original_images[fidelity], images[fidelity],
                                     self.kid_subset_size), 5)
        return metrics

    def _evaluate(self, trainer: L.Trainer, module, original: bool) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        start = time.perf_counter()
        images = self._generate(trainer, module, original)
        if original:
            self.original_images = images
        metrics = self.score(images)
        self.eval_seconds += time.perf_counter() - start
        return images, metrics

    # ----- hooks ---------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, module) -> None:
        self.sampler_description = module.family.describe_sampler(self.sampler)
        _, self.before = self._evaluate(trainer, module, original=True)
        for logger in trainer.loggers:
            logger.log_metrics(scalars("before", self.before), step=trainer.global_step)
        self.fit_started = time.perf_counter()

    def training_seconds(self) -> float:
        """Seconds of the fit so far, periodic evaluations excluded."""
        return time.perf_counter() - self.fit_started - self.paused

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and trainer.global_step < trainer.max_steps:
            trained_for, paused_at = self.training_seconds(), time.perf_counter()
            _, metrics = self._evaluate(trainer, module, original=False)
            self.history.append({"step": trainer.global_step, "train_seconds": round(trained_for, 2), **metrics})
            for logger in trainer.loggers:
                logger.log_metrics(scalars("eval", metrics), step=trainer.global_step)
            self.paused += time.perf_counter() - paused_at

    def on_fit_end(self, trainer: L.Trainer, module) -> None:
        fit_seconds = self.training_seconds()
        images, after = self._evaluate(trainer, module, original=False)
        self.history.append({"step": trainer.global_step, "train_seconds": round(fit_seconds, 2), **after})
        seconds = {"seconds/fit": fit_seconds, "seconds/eval": self.eval_seconds}
        for logger in trainer.loggers:
            logger.log_metrics({**scalars("after", after), **seconds}, step=trainer.global_step)
        if trainer.is_global_zero:
            self.write(images, after, fit_seconds)
            for suite in self.suites:
                log_image(trainer.loggers, f"samples/{suite}", self.output_dir / "samples" / f"{suite}.png",
                          trainer.global_step)
        for logger in trainer.loggers:
            logger.save()

    # ----- outputs -------------------------------------------------------------------------
    def protocol(self) -> dict:
        scorer = {"clip_score": self.scorer.name} if self.scorer is not None else {}
        return {"name": self.run_info.get("protocol"),
                "sampler": self.sampler_description,
                "guidance": self.sampler.guidance, "images_per_prompt": self.images_per_prompt,
                "seeds": "evaluation_seed + k, k < images_per_prompt",
                "evaluator": self.evaluator.name if self.evaluator is not None else "none", **scorer,
                "suites": {s: len(rows) for s, rows in self.suites.items()}}

    def write(self, images: dict[str, torch.Tensor], after: dict[str, float], fit_seconds: float) -> None:
        out = self.output_dir
        grids = {}
        for suite, rows in self.suites.items():
            (out / "prompts").mkdir(parents=True, exist_ok=True)
            write_csv(rows, out / "prompts" / f"{suite}.csv")
            path = out / "samples" / f"{suite}.png"
            comparison_grid([r.prompt for r in rows], self.original_images[suite], images[suite],
                            self.images_per_prompt, path)
            grids[suite] = f"samples/{suite}.png"
        info = {k: v for k, v in self.run_info.items() if k != "protocol"}  # the protocol's name is in "protocol"
        protocol = self.protocol()
        metrics = {**info, "before": self.before, "after": after,
                   "seconds": {"fit": round(fit_seconds, 1), "eval": round(self.eval_seconds, 1)},
                   "protocol": protocol,
                   **({"history": self.history} if self.every_n_steps else {})}
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        write_report(out / "report.md", metrics, protocol, grids)

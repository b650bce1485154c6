"""Methods built from a config, and finished runs restored from their run directory.

    run = load_run("runs/esd/20261122-101500")
    images = run.module.generate(["a circle"], [0], Sampler())                 # the erased model
    originals = run.module.generate(["a circle"], [0], Sampler(), original=True)

A restored run is the method's module with the saved result (weight delta, LoRA folder or
instruction rule) loaded on top of the base model named in its ``config.yaml``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from erasure.bundle import load_pipeline
from erasure.config import ConfigError, load_run_config, resolve_path
from erasure.methods import METHODS
from erasure.methods.base import EraserModule


def build_module(config: DictConfig, pipeline=None) -> EraserModule:
    """The method module of a validated run config, on the config's model unless one is given."""
    pipeline = pipeline or load_pipeline(resolve_path(config.model.path))
    method = METHODS[config.method.name]
    return method(pipeline, OmegaConf.to_object(config.method), list(config.concept), seed=config.seed,
                  resolution=config.model.resolution)


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
    module = build_module(config)
    module.load_erased(path / "erased")
    return Run(path, config, json.loads(metrics_path.read_text()), module)

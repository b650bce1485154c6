"""The run's experiment logger (``trainer.logger``), Lightning's own, each writing into the run directory:

    csv          <run>/logs/metrics.csv (default; no extra package)
    tensorboard  <run>/logs/events.out.tfevents.*     pip install "erasure[tensorboard]";  tensorboard --logdir <run>/logs
    wandb        <run>/wandb, offline unless WANDB_MODE=online   pip install "erasure[wandb]";  wandb sync <run>/wandb/offline-run-*
    mlflow       <run>/mlruns unless MLFLOW_TRACKING_URI is set  pip install "erasure[mlflow]";  mlflow ui --backend-store-uri <run>/mlruns

Each gets the training loss, the evaluation's metrics (before, every ``evaluation.every_n_steps``
and after), the fit and evaluation seconds, and the sample grids as images (the CSV logger keeps
scalars only; the grids are in <run>/samples/).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

# logger -> the package it needs (the config checks it; this module imports Lightning only when used)
PACKAGES = {"csv": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def build_logger(name: str, output: Path):
    """The logger ``name`` (a key of :data:`PACKAGES`, checked by the config) for the run directory ``output``."""
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    if name == "tensorboard":
        return TensorBoardLogger(output, name="logs", version="", default_hp_metric=False)
    if name == "wandb":
        return WandbLogger(save_dir=output, project="erasure", name=output.name,
                           offline=os.environ.get("WANDB_MODE") != "online")
    if name == "mlflow":
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (output / "mlruns").resolve().as_uri()
        return MLFlowLogger(experiment_name="erasure", run_name=output.name, tracking_uri=uri)
    return CSVLogger(output, name="logs", version="")


def log_image(loggers: list, key: str, path: Path, step: int) -> None:
    """Log the image file ``path`` under ``key`` to every logger that keeps images."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            pixels = np.asarray(Image.open(path).convert("RGB"))
            logger.experiment.add_image(key, pixels, step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=key.rsplit("/", 1)[0])

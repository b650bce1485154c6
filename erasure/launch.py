"""Running the training commands of ``erasure.compare``: here one after another, as local processes, or on a
SLURM cluster. (Multiruns of ``erasure.train -m`` take Hydra's launchers instead: :mod:`erasure.multirun`.)

The engine is submitit (Meta's job launcher, the one behind Hydra's submitit launcher): its local
executor starts each job as a process of this machine, its SLURM executor submits job arrays, and
the code that runs a job is the same for both. Each job is ``python -m erasure.train <arguments>`` in
its own process, so Lightning's DDP launcher can re-run a multi-device job's command line.

    launcher.cluster=inline   one after another in this process (default)
    launcher.cluster=local    local processes, ``launcher.parallel`` at once; with
                              ``launcher.gpus_per_job=k`` each job sees its own k GPUs
                              (CUDA_VISIBLE_DEVICES); on CPUs the cores are shared out
                              (``OMP_NUM_THREADS`` = cores / parallel)
    launcher.cluster=slurm    a SLURM job array, ``launcher.parallel`` jobs at once,
                              ``launcher.gpus_per_job`` GPUs and ``launcher.timeout_min`` each,
                              on ``launcher.slurm_partition``

submitit's logs of every job are in <output>/launcher/.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from erasure.config import ConfigError

CLUSTERS = ("inline", "local", "slurm")


@dataclass
class LaunchConfig:
    cluster: str = "inline"  # inline | local | slurm
    parallel: int = 1  # jobs at once
    gpus_per_job: int = 0
    timeout_min: int = 720
    slurm_partition: str | None = None


def check_launcher(config: LaunchConfig) -> None:
    if config.cluster not in CLUSTERS:
        raise ConfigError(f"invalid value for 'launcher.cluster': {config.cluster!r}; choose one of: {', '.join(CLUSTERS)}")
    if config.parallel < 1 or config.gpus_per_job < 0 or config.timeout_min < 1:
        raise ConfigError("launcher.parallel and launcher.timeout_min must be at least 1, launcher.gpus_per_job at least 0")


def train_command(arguments: list[str], threads: int | None = None) -> int:
    """One job: ``python -m erasure.train <arguments>`` in a process of its own; returns its exit code."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    return subprocess.run([sys.executable, "-m", "erasure.train", *arguments], env=env).returncode


def launch(commands: list[list[str]], config: LaunchConfig, folder: Path) -> list[int]:
    """Run every command (the arguments of one ``erasure.train`` each); returns their exit codes, in order."""
    if config.cluster == "inline":
        return [train_command(arguments) for arguments in commands]
    import submitit

    executor = submitit.AutoExecutor(folder=folder / "launcher", cluster=config.cluster)
    executor.update_parameters(timeout_min=config.timeout_min, gpus_per_node=config.gpus_per_job,
                               **({"slurm_partition": config.slurm_partition} if config.slurm_partition else {}))
    if config.cluster == "slurm":
        executor.update_parameters(slurm_array_parallelism=config.parallel)
        jobs = executor.map_array(train_command, commands)
        return [job.result() for job in jobs]
    return run_local(executor, commands, config)


def run_local(executor, commands: list[list[str]], config: LaunchConfig) -> list[int]:
    """At most ``config.parallel`` local jobs at once, each on its own slot (its GPUs, its share of the cores)."""
    threads = None if config.gpus_per_job else max(1, (os.cpu_count() or 1) // config.parallel)
    codes: list[int] = [0] * len(commands)
    pending = list(range(len(commands)))
    running: dict[int, tuple[object, int]] = {}  # command index -> (job, slot)
    free_slots = list(range(config.parallel))
    while pending or running:
        while pending and free_slots:
            k, slot = pending.pop(0), free_slots.pop(0)
            if config.gpus_per_job:
                first = slot * config.gpus_per_job
                executor.update_parameters(visible_gpus=list(range(first, first + config.gpus_per_job)))
            running[k] = (executor.submit(train_command, commands[k], threads), slot)
        for k, (job, slot) in list(running.items()):
            if job.done():
                codes[k] = job.result()
                free_slots.append(slot)
                del running[k]
        time.sleep(0.5)
    return codes

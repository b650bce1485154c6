"""Peak resident memory of a real-size run: ESD-u (the paper's setting for objects and nudity) on a
random-weight SD-1.5-architecture folder, one training step, its Lightning checkpoint and its saved delta,
as the run's defaults do it and with the denoiser's gradient checkpointing (``VARIANTS``).

    python -m benchmarks.run_memory                    # writes benchmarks/run_memory.json
    python -m benchmarks.run_memory --keep runs/mem    # and keeps the model folder and the run there

The run is ``python -m erasure.train recipe=esd protocol=objects concept=circle evaluation.enabled=false
trainer.max_steps=1 method.ddim_steps=2`` in a process of its own (x_t from 2 DDIM steps instead of the
preset's 50: sampling runs without gradients, so it changes the time, not the peak); the peak is that
process's maximum resident set size (``ru_maxrss`` of ``wait4``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from erasure.io import atomic_write_text
from erasure.toyworld.real_architectures import build_random_pipeline

RESULT = Path(__file__).with_name("run_memory.json")
COMMAND = ["recipe=esd", "protocol=objects", "concept=circle", "evaluation.enabled=false", "trainer.max_steps=1",
           "method.ddim_steps=2"]
VARIANTS = {"defaults": [], "gradient checkpointing": ["model.gradient_checkpointing=true"]}


def measure(root: Path) -> dict:
    """Build the folder, run the command in each variant, and report peak memory, time and outputs."""
    model = root / "sd15-random"
    if not (model / "model_index.json").is_file():
        build_random_pipeline("sd15").save_pretrained(model, safe_serialization=True)
    return {name: measure_run(model, root / "run", options) for name, options in VARIANTS.items()}


def measure_run(model: Path, run: Path, options: list[str]) -> dict:
    """One run of the command with ``options``, in a process of its own."""
    started = time.perf_counter()
    with open(run.with_suffix(".log"), "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "erasure.train", *COMMAND, *options, f"model.path={model}",
                                    f"output_dir={run}", "overwrite=true"], stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status):
        last = run.with_suffix(".log").read_text().strip().splitlines()[-1:]
        raise SystemExit(f"the run failed (exit {os.waitstatus_to_exitcode(status)}): {last}")
    config = OmegaConf.load(run / "config.yaml")
    sizes = {path.relative_to(run).as_posix(): round(path.stat().st_size / 2**30, 3)
             for path in [*run.glob("checkpoints/*.ckpt"), *run.glob("erased/*.safetensors")]}
    return {"command": "python -m erasure.train " + " ".join(COMMAND + options) + " model.path=<random SD-1.5 folder>",
            "train_method": config.method.train_method, "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),  # KiB
            "seconds": round(seconds, 1), "files_gib": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="keep the model folder and the run in this folder")
    arguments = parser.parse_args()
    if arguments.keep:
        arguments.keep.mkdir(parents=True, exist_ok=True)
        result = measure(arguments.keep)
    else:
        with tempfile.TemporaryDirectory() as folder:
            result = measure(Path(folder))
    atomic_write_text(RESULT, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

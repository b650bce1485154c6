"""Time and peak memory of the closed-form erasers at N concepts: UCE's multi-concept solve and SPEED's
null-space edit, on the toy model and on random-weight SD-1.5 and SDXL architectures.

    python -m benchmarks.mass_scale                                  # CPU: writes benchmarks/mass_scale_cpu.json
    python -m benchmarks.mass_scale --device cuda --output <file>    # the same on a GPU

N concepts are distinct toy-world compounds ("striped red circle"; past 144, the same compounds worded with
synonyms, up to 1,152), each edited towards a guide compound, with 100 other compounds preserved (UCE)
or retained (SPEED), as "100 erased, 100 preserved". The time is the method's ``edit()``: encoding the
keys, solving, writing the weights, after one warm-up edit at N = 1 (each edit starts from the weights the
last one wrote: random weights either way); on a GPU the clock stops after a synchronisation.
Peak memory: the GPU's allocator peak during the edit, or on the CPU the process's resident peak so far
(``ru_maxrss``, monotonic: the model's own size included).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from itertools import product
from pathlib import Path

import torch

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.io import atomic_write_text
from erasure.methods.speed import SPEED, SPEEDConfig
from erasure.methods.uce import UCE, UCEConfig
from erasure.toyworld.real_architectures import build_random_pipeline, build_random_sdxl_pipeline
from erasure.toyworld.world import SYNONYMS
from evaluation.protocols.mass import COMPOUNDS, guide_of
from evaluation.protocols.toyworld import values_of

METHODS = {"uce": (UCE, UCEConfig), "speed": (SPEED, SPEEDConfig)}
COUNTS = (1, 10, 100, 1000)
PRESERVED = 100


def concept_names(count: int) -> list[str]:
    """``count`` distinct compound phrases: the 144 compounds, then their words swapped for synonyms."""
    names = list(COMPOUNDS)
    for mask in product((0, 1), repeat=3):
        if any(mask):
            names += [" ".join(SYNONYMS[v][0] if m else w for m, w, v in zip(mask, c.split(), values_of(c)))
                      for c in COMPOUNDS]
    return names[:count]


def build(architecture: str):
    if architecture == "toyworld":
        return load_pipeline(TOYWORLD_MODEL)
    return build_random_sdxl_pipeline() if architecture == "sdxl" else build_random_pipeline(architecture)


def measure(pipeline, method: str, count: int, device: str) -> dict:
    cls, config_cls = METHODS[method]
    concepts = concept_names(count)
    kept = concept_names(count + PRESERVED)[count:]  # the next 100 phrases: never an erased one
    config = config_cls(prompt_template="a {concept}", guide=[guide_of(c, concepts) for c in concepts], preserve=kept)
    module = cls(pipeline, config, concepts).to(device)
    module.on_fit_start()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    phases = module.edit()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"method": method, "concepts": count, "preserved": len(kept), "seconds": round(seconds, 4),
            **{f"{k}_s": round(v, 4) for k, v in phases.items()}, "edited_matrices": len(module.trained),
            "peak_memory_gib": round(peak / 2 ** 30, 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mass_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--architectures", nargs="+", default=["toyworld", "sd15", "sdxl"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--counts", nargs="+", type=int, default=list(COUNTS))
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    output = args.output or Path(__file__).with_name(f"mass_scale_{args.device.split(':')[0]}.json")
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    rows = []
    for architecture in args.architectures:
        pipeline = build(architecture)
        for method in args.methods:
            measure(pipeline, method, 1, args.device)  # warm-up: kernels, allocator
            for count in args.counts:
                row = {"architecture": architecture, **measure(pipeline, method, count, args.device)}
                print(json.dumps(row), flush=True)
                rows.append(row)
        del pipeline
    atomic_write_text(output, json.dumps({"machine": machine, "device": args.device, "rows": rows}, indent=1) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()

"""Time and peak memory of the mass erasers at N concepts: UCE's multi-concept solve, SPEED's null-space edit
and MACE's three stages, on the toy model and on random-weight SD-1.5, SDXL and FLUX architectures.

    python -m benchmarks.mass_scale                                  # CPU: writes benchmarks/mass_scale_cpu.json
    python -m benchmarks.mass_scale --device cuda --output <file>    # the same on a GPU
    python -m benchmarks.mass_scale --methods mace --architectures sd15 --counts 1 10 --lora-concepts 2

N concepts are distinct toy-world compounds ("striped red circle"; past 144, the same compounds worded with
synonyms, up to 1,152), each edited towards a guide compound, with 100 other compounds preserved (UCE)
or retained (SPEED), as "100 erased, 100 preserved". The time is the method's ``edit()``: encoding the
keys, solving, writing the weights, after one warm-up edit at N = 1 (each edit starts from the weights the
last one wrote: random weights either way); on a GPU the clock stops after a synchronisation.

MACE is timed by stage: the refinement (``cfr_s``), its LoRAs (``lora_s``: 50 AdamW steps per concept, batch 1,
on 8 images each; the renderer's on the toy world, random 512-pixel images and masks on the random models) and the
fusion (``fusion_s``). With ``--lora-concepts K`` below N only K concepts' LoRAs are trained, and ``lora_s`` is
their time times N / K (``lora_extrapolated``: true); each concept's LoRA is trained alone, so the stage is linear
in N. ``--lora-concepts 0`` times the closed-form stages alone (``lora_s`` null; ``seconds`` their sum). FLUX has UCE only (the authors' FLUX edit; SPEED and MACE are SD code): its transformer is built with one
block of each kind, as the edit reads the text encoders and the two text-input layers alone.
Peak memory: the GPU's allocator peak during the edit, or on the CPU the process's resident peak so far
(``ru_maxrss``, monotonic: the model's own size included).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from itertools import product
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from erasure.bundle import TOYWORLD_MODEL, load_pipeline
from erasure.io import atomic_write_text
from erasure.methods.mace import MACE, STEPS_PER_CONCEPT, MACEConfig, preserve_weight_for
from erasure.methods.speed import SPEED, SPEEDConfig
from erasure.methods.uce import UCE, UCEConfig
from erasure.toyworld.real_architectures import (build_random_flux_pipeline, build_random_pipeline,
                                                 build_random_sdxl_pipeline)
from erasure.toyworld.world import SYNONYMS, values_of
from evaluation.protocols.mass import COMPOUNDS, guide_of

METHODS = {"uce": (UCE, UCEConfig), "speed": (SPEED, SPEEDConfig), "mace": (MACE, MACEConfig)}
TOY_TEMPLATES = ["{}", "a picture of {}", "an image of {}", "a drawing of {}"]  # the toy preset's (recipes/models)
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


def build(architecture: str, device: str):
    if architecture == "toyworld":
        return load_pipeline(TOYWORLD_MODEL)
    if architecture == "flux":
        with torch.device(device):  # 4.8 billion T5 parameters: initialised where they run
            return build_random_flux_pipeline(blocks=(1, 1))
    return build_random_sdxl_pipeline() if architecture == "sdxl" else build_random_pipeline(architecture)


def random_examples(folder: Path, concepts: list[str], size: int) -> Path:
    """8 random images and masks per concept in MACE's data layout."""
    rng = np.random.default_rng(0)
    for concept in concepts:
        for kind in (concept, f"{concept} mask"):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            for i in range(8):
                array = rng.integers(0, 256, (size, size, 3) if kind == concept else (size, size), dtype=np.uint8)
                Image.fromarray(array).save(folder / kind / f"{i}.png")
    return folder


def train_loras(module: MACE, concepts: int) -> None:
    """Stage 2 as the Trainer runs it (the module's objective, AdamW, clipping to 1), for the first ``concepts``."""
    optimizer = module.configure_optimizers()
    parameters = list(module.loras.parameters())
    for index in range(concepts):
        module.concept_at = lambda step, index=index: index
        for step in range(STEPS_PER_CONCEPT):
            module.step_generator = lambda step=step: torch.Generator().manual_seed(step)
            module.objective().backward()
            torch.nn.utils.clip_grad_norm_(parameters, module.config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def synchronised(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def measure_mace(pipeline, architecture: str, count: int, device: str, lora_concepts: int, scratch: Path) -> dict:
    concepts = concept_names(count)
    kept = concept_names(count + PRESERVED)[count:]
    trained = min(count, lora_concepts)  # 0: the closed-form stages alone
    toy = architecture == "toyworld"
    data = "renderer" if toy else str(random_examples(scratch, concepts[:trained], 512))
    config = MACEConfig(prompt_template="a {concept}", guide=[guide_of(c, concepts) for c in concepts], preserve=kept,
                        data=data, preserve_weight=preserve_weight_for(count), **({"templates": TOY_TEMPLATES} if toy else {}))
    module = MACE(pipeline, config, concepts).to(device)
    module.original = {name: value.to(device) for name, value in module.original.items()}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = synchronised(device)
    module.refine()
    refined = synchronised(device)
    if trained:
        module.prepare_examples(trained)
        train_loras(module, trained)
    lorad = synchronised(device)
    module.fuse()
    fused = synchronised(device)
    lora = (lorad - refined) * count / trained if trained else None
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"method": "mace", "concepts": count, "preserved": len(kept),
            "seconds": round(refined - started + (lora or 0) + fused - lorad, 4), "cfr_s": round(refined - started, 4),
            "lora_s": None if lora is None else round(lora, 4), "fusion_s": round(fused - lorad, 4),
            "lora_concepts_trained": trained,
            "lora_extrapolated": 0 < trained < count, "edited_matrices": len(module.trained),
            "peak_memory_gib": round(peak / 2 ** 30, 3)}


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


def measure_cell(pipeline, architecture: str, method: str, count: int, args: argparse.Namespace, scratch: Path) -> dict:
    if method == "mace":
        return measure_mace(pipeline, architecture, count, args.device, args.lora_concepts, scratch / str(count))
    return measure(pipeline, method, count, args.device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mass_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--architectures", nargs="+", default=["toyworld", "sd15", "sdxl"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--counts", nargs="+", type=int, default=list(COUNTS))
    parser.add_argument("--lora-concepts", type=int, default=100, help="MACE: concepts whose LoRAs are trained")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    output = args.output or Path(__file__).with_name(f"mass_scale_{args.device.split(':')[0]}.json")
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    rows = []
    for architecture in args.architectures:
        pipeline = build(architecture, args.device)
        for method in args.methods:
            if method != "uce" and architecture == "flux":
                continue  # SPEED's and MACE's code is SD's
            with tempfile.TemporaryDirectory() as scratch:
                measure_cell(pipeline, architecture, method, 1, args, Path(scratch))  # warm-up: kernels, allocator
                for count in args.counts:
                    if method == "mace" and count > len(COMPOUNDS) and architecture == "toyworld":
                        continue  # the renderer draws the 144 compounds, not their synonyms
                    row = {"architecture": architecture,
                           **measure_cell(pipeline, architecture, method, count, args, Path(scratch))}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        del pipeline
    atomic_write_text(output, json.dumps({"machine": machine, "device": args.device, "rows": rows}, indent=1) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()

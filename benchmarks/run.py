"""Benchmarks: closed-form edit time, training-step time and peak memory, generation speed.

    python -m benchmarks.run                       # everything; prints a table, writes benchmarks/latest.csv
    python -m benchmarks.run --only uce            # one group: uce | steps | generation

Models: the toy world (``toy``) and the SD-1.5 architecture built from its config with random
weights (``sd15``; 77-token CLIP ViT-L context, 768-d keys, 8x8 latents unless --latent).
Each step/memory measurement runs in its own process, because peak resident memory is a
high-water mark of the process: ``forward`` (one no-grad UNet forward) is the baseline that
the training steps' peaks are divided by. ``esd`` and ``lora`` are the paper's loop (x_t sampled
every step by the trained model), ``esd-bank`` and ``lora-bank`` the x_t bank loop, whose first
step (``first_step_s``, not in ``seconds``) samples the bank. The UCE rows time the edit from concept strings to
edited weights (text encoding, the float64 solve, writing W_old T into the 32 projections).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from evaluation.comparison import markdown_table

STEP_KINDS = ("forward", "esd", "esd-bank", "ablation", "lora", "lora-bank")
BANK = {"sample_from": "frozen", "xt_bank": 16}  # the x_t bank loop (the toy presets' default and recipe esd-fast; see erasure.methods.esd)
LORA = {"adapter": "lora", "lora_targets": "xattn"}  # recipe lora: ESD through a LoRA on the cross-attention
UCE_COUNTS = (1, 10, 100, 1000)


def peak_mib() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss
    across exec, so a child would report its parent's peak (here, the SD-1.5 model of the UCE rows)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def load(model: str, latent: int):
    from erasure.toyworld.real_architectures import build_random_pipeline
    from erasure.bundle import TOYWORLD_MODEL, load_pipeline

    return load_pipeline(TOYWORLD_MODEL) if model == "toy" else build_random_pipeline(model, sample_size=latent)


def concept_names(count: int, offset: int = 0) -> list[str]:
    """Distinct two-word concept names from the tokenizer's vocabulary."""
    from erasure.toyworld.captions import vocabulary

    words = sorted(vocabulary())
    pairs = itertools.islice(itertools.product(words, words), offset, offset + count)
    return [f"{a} {b}" for a, b in pairs]


def measure_step(kind: str, model: str, latent: int, repeats: int) -> dict:
    """One process: build the model, time ``repeats`` training steps (after one warm-up), report the peak."""
    from erasure.methods.ablation import Ablation, AblationConfig, Anchors
    from erasure.methods.esd import ESD, ESDConfig

    pipeline = load(model, latent)
    if kind == "forward":
        with torch.no_grad():
            embeds = pipeline.encode_prompt(["a circle"], "cpu", 1, False)[0]
            size = pipeline.unet.config.sample_size
            started = time.perf_counter()
            for _ in range(repeats):
                pipeline.unet(torch.randn(1, 4, size, size), torch.tensor([500]), encoder_hidden_states=embeds)
        return {"seconds": (time.perf_counter() - started) / repeats, "peak_mib": peak_mib(), "latent": size}
    paper = {"sample_from": "trained", "xt_bank": 0}
    module = {
        "esd": lambda: ESD(pipeline, ESDConfig(train_method="esd-x", ddim_steps=10, batch_size=1, **paper), ["circle"]),
        "esd-bank": lambda: ESD(pipeline, ESDConfig(train_method="esd-x", ddim_steps=10, batch_size=1, **BANK),
                                ["circle"]),
        "ablation": lambda: Ablation(pipeline, AblationConfig(anchor="square", anchor_prompts=["a square"], batch_size=1,
                                                              num_anchor_images=2, anchor_steps=2), ["circle"]),
        "lora": lambda: ESD(pipeline, ESDConfig(ddim_steps=10, batch_size=1, **LORA, **paper), ["circle"]),
        "lora-bank": lambda: ESD(pipeline, ESDConfig(ddim_steps=10, batch_size=1, **LORA, **BANK), ["circle"]),
    }[kind]()
    module.log = lambda *args, **kwargs: None
    if kind == "ablation":
        with tempfile.TemporaryDirectory() as folder:
            module.anchors = Anchors.load_or_generate(module, module.config, Path(folder) / "anchors.safetensors")
    optimizer = module.configure_optimizers()

    def step(index: int) -> None:
        optimizer.zero_grad()
        module.objective().backward()
        optimizer.step()

    started = time.perf_counter()
    step(0)  # warm-up; the bank loops sample their bank here
    first = time.perf_counter() - started
    started = time.perf_counter()
    for index in range(1, repeats + 1):
        step(index)
    return {"seconds": (time.perf_counter() - started) / repeats, "first_step_s": first, "peak_mib": peak_mib(),
            "latent": pipeline.unet.config.sample_size}


def steps_table(latent: int) -> list[dict]:
    rows = []
    for model in ("toy", "sd15"):
        results = {}
        for kind in STEP_KINDS:
            command = [sys.executable, "-m", "benchmarks.run", "--measure", kind, "--model", model,
                       "--latent", str(latent)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[kind] = json.loads(output.strip().splitlines()[-1])
            print(f"  {model} {kind}: {results[kind]['seconds']:.3f} s, peak {results[kind]['peak_mib']:.0f} MiB",
                  flush=True)
        for kind in STEP_KINDS:
            ratio = results[kind]["peak_mib"] / results["forward"]["peak_mib"]
            first = results[kind].get("first_step_s")
            rows.append({"benchmark": f"{kind} step" if kind != "forward" else "no-grad UNet forward",
                         "model": model, "size": f"latent {results[kind]['latent']}",
                         "seconds": round(results[kind]["seconds"], 4),
                         "first_step_s": round(first, 3) if first is not None else None,
                         "peak_mib": round(results[kind]["peak_mib"]), "peak_vs_forward": round(ratio, 2)})
    return rows


def uce_table(latent: int) -> list[dict]:
    from erasure.methods.uce import UCE, UCEConfig

    pipeline = load("sd15", latent)
    rows = []
    for count in UCE_COUNTS:
        erase, preserve = concept_names(count), concept_names(count, offset=count)
        module = UCE(pipeline, UCEConfig(preserve=preserve, token_mode="last"), erase)
        module.edit()  # warm-up (first calls allocate)
        best = min((module.edit() for _ in range(3)), key=lambda s: sum(s.values()))
        rows.append({"benchmark": f"UCE edit, {count} erased + {count} preserved", "model": "sd15",
                     "size": "32 projections", "seconds": round(sum(best.values()), 3),
                     **{f"{phase}_s": round(value, 3) for phase, value in best.items()}})
        print(f"  UCE {count}+{count}: {sum(best.values()):.3f} s {best}", flush=True)
    return rows


def generation_table(latent: int) -> list[dict]:
    from erasure.generation import Sampler, generate

    rows = []
    for model, count in (("toy", 64), ("sd15", 4)):
        pipeline = load(model, latent)
        prompts = ["a red circle"] * count
        generate(pipeline, prompts[:2], [0, 1], Sampler(steps=2))  # warm-up
        started = time.perf_counter()
        generate(pipeline, prompts, list(range(count)), Sampler(steps=25))
        seconds = time.perf_counter() - started
        rows.append({"benchmark": f"generation, {count} images, DDIM 25, CFG", "model": model,
                     "size": f"{pipeline.unet.config.sample_size * pipeline.vae_scale_factor} px",
                     "seconds": round(seconds, 2), "images_per_s": round(count / seconds, 2)})
        print(f"  generation {model}: {count / seconds:.2f} images/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["uce", "steps", "generation"])
    parser.add_argument("--latent", type=int, default=8, help="latent size of the SD-1.5 architecture")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/latest.csv"))
    parser.add_argument("--measure", choices=STEP_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="toy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_step(args.measure, args.model, args.latent, args.repeats)))
        return
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"benchmarks on {machine}", flush=True)
    groups = {}
    for group, table in (("uce", uce_table), ("steps", steps_table), ("generation", generation_table)):
        if args.only in (None, group):
            print(f"{group}:", flush=True)
            groups[group] = table(args.latent)
    rows = [row for group_rows in groups.values() for row in group_rows]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    staging = args.output.with_name(f".{args.output.name}.partial")
    with open(staging, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["machine", *columns])
        writer.writeheader()
        writer.writerows({"machine": machine, **row} for row in rows)
    staging.replace(args.output)
    print(f"\n{machine}\n")
    print("\n\n".join(markdown_table(group_rows) for group_rows in groups.values()))
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()

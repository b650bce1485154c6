"""Sequential erasure: requests arrive one at a time, each erased from the model the previous request left.

    python -m benchmarks.sequential                          # uce, speed and mace, 20 requests: runs/sequential/
    python -m benchmarks.sequential --recipes uce --requests 5 --output runs/sequential-quick

The requests are the mass protocol's first ``--requests`` drawn compounds. Request k runs
``python -m erasure.train recipe=<recipe> protocol=mass concept=[<c_k>] model.path=<model k-1>`` (in this
process, without its evaluation), and its delta applied to model k-1 is saved as model k. After each request
the model is judged on the mass protocol's suites for the requests so far (:class:`evaluation.protocols.mass.Mass`):
efficacy on every earlier request (and on the first alone), generality on their synonyms, specificity on the
kept compounds one value away from a request (neighbours) and the rest, with 95% Wilson intervals.
``sequential.json`` holds every step; ``sequential.png`` draws the curves. Resumable: finished steps are kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from erasure.bundle import TOYWORLD_CLASSIFIER, TOYWORLD_MODEL, load_pipeline
from erasure.config import load_config
from erasure.generation import Sampler, generate
from erasure.io import atomic_write_text
from erasure.runs import train
from erasure.weights import DELTA_FILE, export_pipeline
from evaluation.metrics import harmonic_mean, share_with_interval
from evaluation.protocols.mass import Mass, drawn_compounds
from evaluation.protocols.toyworld import ToyWorldEvaluator, ToyWorldEvaluatorConfig

SAMPLER = Sampler()  # the toy protocol's: DDIM 25 steps, guidance 6


def judge_step(model: Path, requests: list[str], judge) -> dict:
    """The model's shares on the mass protocol's suites for ``requests`` (one image per prompt)."""
    pipeline = load_pipeline(model)
    row = {}
    for suite, prompts in Mass().suites(requests, {}, 0).items():
        images = generate(pipeline, [p.prompt for p in prompts], [p.evaluation_seed for p in prompts], SAMPLER)
        seen = judge.sees(images, [p.concept for p in prompts])
        row |= share_with_interval(seen, f"{suite}_acc")
        if suite == "target":
            first = torch.tensor([p.concept == requests[0] for p in prompts])
            row |= share_with_interval(seen[first], "first_request_acc")
    kept = [row[f"{s}_acc"] for s in ("neighbour", "distant") if f"{s}_acc" in row]
    row["harmonic_mean"] = round(harmonic_mean([1 - row["target_acc"], 1 - row["synonym_acc"],
                                                sum(kept) / len(kept)]), 4)
    return row


def run_sequence(recipe: str, requests: list[str], root: Path, judge, extra: list[str]) -> list[dict]:
    steps_file = root / recipe / "steps.json"
    steps = json.loads(steps_file.read_text()) if steps_file.is_file() else []
    model = Path(steps[-1]["model"]) if steps else TOYWORLD_MODEL
    for k in range(len(steps), len(requests)):
        run = root / recipe / f"request-{k + 1:02d}"
        config = load_config([f"recipe={recipe}", "protocol=mass", f"concept=[{requests[k]}]", f"model.path={model}",
                              "evaluation.enabled=false", f"output_dir={run}", "overwrite=true", *extra])
        train(config)
        model = export_pipeline(model, run / "erased" / DELTA_FILE, root / recipe / f"model-{k + 1:02d}")
        steps.append({"request": k + 1, "concept": requests[k], "model": str(model),
                      **judge_step(model, requests[:k + 1], judge)})
        print(json.dumps({"recipe": recipe, **steps[-1]}), flush=True)
        atomic_write_text(steps_file, json.dumps(steps, indent=1) + "\n")
    return steps


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharex=True)
    for recipe, steps in results.items():
        x = [s["request"] for s in steps]
        for axis, key, title in zip(axes, ("target_acc", "first_request_acc", "neighbour_acc"),
                                    ("every request so far (lower is better)", "the first request (lower is better)",
                                     "kept neighbours (higher is better)")):
            axis.plot(x, [s[key] for s in steps], marker="o", label=recipe)
            axis.fill_between(x, [s[f"{key}_ci95"][0] for s in steps], [s[f"{key}_ci95"][1] for s in steps], alpha=0.15)
            axis.set_title(title, fontsize=9)
            axis.set_xlabel("requests erased")
            axis.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("share of images showing the compound")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sequential", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["uce", "speed", "mace"])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--output", type=Path, default=Path("runs/sequential"))
    parser.add_argument("overrides", nargs="*", help="key=value for every run, e.g. method.lam=0.1")
    args = parser.parse_args(argv)
    requests = drawn_compounds(args.requests)
    judge = ToyWorldEvaluator(ToyWorldEvaluatorConfig(str(TOYWORLD_CLASSIFIER)))
    results = {recipe: run_sequence(recipe, requests, args.output, judge, args.overrides) for recipe in args.recipes}
    atomic_write_text(args.output / "sequential.json", json.dumps(results, indent=1) + "\n")
    plot(results, args.output / "sequential.png")
    print(f"wrote {args.output / 'sequential.json'} and sequential.png")


if __name__ == "__main__":
    main()

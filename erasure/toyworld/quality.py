"""Measure the shipped toy-world model and classifier.

    python -m erasure.toyworld.quality [--model checkpoints/toyworld/sd] [--seeds 4]
    python -m erasure.toyworld.quality --model toyworld-flux     # the FLUX-format model (a shipped name or a folder)

* generation: every prompt "a {style} {color} {shape}" (144) with ``--seeds`` seeds; the
  classifier's accuracy on each attribute;
* synonyms: prompts naming a concept by its synonym ("a disk", "a crimson box"); accuracy
  on the attribute the synonym names;
* understanding: held-out truthful prompts in the instruction language, "a red shape without any
  circle", "please draw a blue object, not a star" (the (shape, colour) pairs of
  :data:`~erasure.toyworld.captions.HELD_OUT_PAIRS`, never in an absence clause during training):
  the share of images showing the concept named as absent (bar: at most 10%), beside the same
  prompt without the absence clause ("a red shape": a circle about 1 time in 6), and the
  accuracy on the attribute the prompt names;
* classifier: accuracy on fresh renders and on their VAE reconstructions;
* speed: seconds to generate 64 images.

Writes ``<model>/../quality.json``, a grid of generations ``docs/toyworld_base.png`` and one of the
understanding prompts ``docs/toyworld_understanding.png`` (for a model folder other than ``sd``, e.g.
``flux``: ``quality_flux.json``, ``docs/toyworld_flux_base.png``, ``docs/toyworld_flux_understanding.png``) (a row per held-out pair and direction:
the prompt without the absence clause, then each absence template).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from erasure.bundle import SHIPPED_MODELS, TOYWORLD_CLASSIFIER, TOYWORLD_MODEL, load_pipeline, resolve_path
from erasure.generation import Sampler, generate, to_unit_range
from erasure.io import atomic_write_text
from erasure.toyworld.captions import HELD_OUT_PAIRS, with_article
from erasure.toyworld.classifier import load_classifier, predict
from erasure.toyworld.world import (
    ATTRIBUTES, COLORS, SHAPES, STYLES, SYNONYMS, WORDS, attribute_of, render_array, sample_scene,
)


def attribute_prompts() -> list[tuple[str, dict[str, str]]]:
    """("a striped red circle", {"shape": "circle", "color": "red", "style": "striped"}) for all combinations."""
    return [
        (with_article(f"{WORDS[style]} {color} {shape}"), {"shape": shape, "color": color, "style": style})
        for shape, color, style in itertools.product(SHAPES, COLORS, STYLES)
    ]


def synonym_prompts() -> list[tuple[str, dict[str, str]]]:
    """Prompts that name one concept by a synonym; labels hold the attributes named."""
    prompts = []
    for concept, synonyms in SYNONYMS.items():
        for synonym in synonyms:
            if attribute_of(concept) == "shape":
                prompts.append((with_article(synonym), {"shape": concept}))
            else:
                prompts += [(with_article(f"{synonym} {shape}"), {attribute_of(concept): concept, "shape": shape})
                            for shape in SHAPES]
    prompts.append(("a crimson box", {"color": "red", "shape": "square"}))
    return prompts


# {n}: the named concept as a phrase ("a red shape", "a circle"), {x}: the absent concept's word,
# {ax}: the same with its article when it is a shape
ABSENCE_TEMPLATES = {
    "without any": "{n} without any {x}",
    "not": "please draw {n}, not {ax}",
    "do not draw": "do not draw {ax}, {n}",
    "forget": "please forget anything about {x}. please draw {n}.",
}


def understanding_prompts() -> list[tuple[str, str, dict[str, str], str]]:
    """(template, prompt, named attribute, absent concept) for every held-out pair both ways: a colour
    named and a shape absent ("a red shape without any circle"), a shape named and a colour absent
    ("a circle without any red"). Template "none" is the prompt without the absence clause."""
    rows = []
    for shape, color in HELD_OUT_PAIRS:
        for named_phrase, named, absent in ((with_article(f"{color} shape"), {"color": color}, shape),
                                            (with_article(shape), {"shape": shape}, color)):
            word = WORDS[absent]
            phrase = with_article(word) if absent == shape else word
            rows.append(("none", named_phrase, named, absent))
            rows += [(name, template.format(n=named_phrase, x=word, ax=phrase), named, absent)
                     for name, template in ABSENCE_TEMPLATES.items()]
    return rows


def understanding(predicted: dict[str, torch.Tensor], rows, seeds: int) -> dict:
    """Per template: the share of images showing the absent concept and the named-attribute accuracy
    (image ``k`` belongs to ``rows[k // seeds]``)."""
    def seen(k: int, attribute: str) -> str:
        return ATTRIBUTES[attribute][int(predicted[attribute][k])]

    result = {}
    for template in ["none", *ABSENCE_TEMPLATES]:
        images = [k for k in range(len(rows) * seeds) if rows[k // seeds][0] == template]
        shown = [seen(k, attribute_of(rows[k // seeds][3])) == rows[k // seeds][3] for k in images]
        named = [seen(k, a) == v for k in images for a, v in rows[k // seeds][2].items()]
        result[template] = {"images": len(images), "absent_concept_shown": round(float(np.mean(shown)), 4),
                            "named_attribute_acc": round(float(np.mean(named)), 4)}
    clauses = [v for k, v in result.items() if k != "none"]
    result["all absence clauses"] = {
        "images": sum(v["images"] for v in clauses),
        "absent_concept_shown": round(float(np.mean([v["absent_concept_shown"] for v in clauses])), 4),
        "named_attribute_acc": round(float(np.mean([v["named_attribute_acc"] for v in clauses])), 4),
    }
    return result


def accuracy(predicted: dict[str, torch.Tensor], labels: list[dict[str, str]]) -> dict[str, float]:
    """Share of images whose predicted attribute equals the label, per labelled attribute."""
    result = {}
    for name in ATTRIBUTES:
        rows = [i for i, label in enumerate(labels) if name in label]
        if rows:
            truth = torch.tensor([ATTRIBUTES[name].index(labels[i][name]) for i in rows])
            result[name] = round(float((predicted[name][rows] == truth).float().mean()), 4)
    return result


def save_grid(images: torch.Tensor, columns: int, path: Path, scale: int = 2) -> None:
    rows = -(-len(images) // columns)
    size = images.shape[1]
    grid = np.full((rows * (size + 2), columns * (size + 2), 3), 255, dtype=np.uint8)
    for i, image in enumerate(images.numpy()):
        r, c = divmod(i, columns)
        grid[r * (size + 2) + 1 : r * (size + 2) + 1 + size, c * (size + 2) + 1 : c * (size + 2) + 1 + size] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST).save(path)


def measure(model: Path, classifier_path: Path, seeds: int, sampler: Sampler, grid: Path | None,
            understanding_grid: Path | None = None) -> dict:
    pipeline = load_pipeline(model)
    classifier = load_classifier(classifier_path)
    report: dict = {"model": str(model), "sampler": vars(sampler), "seeds_per_prompt": seeds}

    prompts = attribute_prompts()
    texts = [p for p, _ in prompts for _ in range(seeds)]
    labels = [label for _, label in prompts for _ in range(seeds)]
    images = generate(pipeline, texts, [s for _ in prompts for s in range(seeds)], sampler, progress=True)
    report["attribute_prompts"] = {"images": len(images), **accuracy(predict(classifier, to_unit_range(images)), labels)}
    if grid is not None:  # first seed of every prompt: a row per shape, colours x styles across
        save_grid(images[::seeds], columns=len(COLORS) * len(STYLES), path=grid)

    prompts = synonym_prompts()
    texts = [p for p, _ in prompts for _ in range(seeds)]
    labels = [label for _, label in prompts for _ in range(seeds)]
    images = generate(pipeline, texts, [100 + s for _ in prompts for s in range(seeds)], sampler, progress=True)
    report["synonym_prompts"] = {"images": len(images), **accuracy(predict(classifier, to_unit_range(images)), labels)}

    rows = understanding_prompts()
    texts = [row[1] for row in rows for _ in range(seeds)]
    images = generate(pipeline, texts, [200 + s for _ in rows for s in range(seeds)], sampler, progress=True)
    report["understanding"] = understanding(predict(classifier, to_unit_range(images)), rows, seeds)
    if understanding_grid is not None:  # first seed: a row per (named, absent) pair, templates across
        save_grid(images[::seeds], columns=1 + len(ABSENCE_TEMPLATES), path=understanding_grid, scale=3)

    rng = np.random.default_rng(12345)
    scenes = [sample_scene(rng) for _ in range(2000)]
    renders = to_unit_range(torch.from_numpy(render_array(scenes)))
    with torch.no_grad():
        recons = pipeline.vae.decode(pipeline.vae.encode(renders).latent_dist.mean).sample.clamp(-1, 1)
    scene_labels = [{n: getattr(s, n) for n in ATTRIBUTES} for s in scenes]
    report["classifier"] = {
        "fresh_renders": accuracy(predict(classifier, renders), scene_labels),
        "vae_reconstructions": accuracy(predict(classifier, recons), scene_labels),
    }

    generate(pipeline, ["a red circle"] * 8, list(range(8)), sampler)  # warm-up
    start = time.perf_counter()
    generate(pipeline, [p for p, _ in attribute_prompts()[:64]], list(range(64)), Sampler(steps=25, guidance=sampler.guidance))
    report["seconds_for_64_images_25_steps"] = round(time.perf_counter() - start, 2)
    report["torch_threads"] = torch.get_num_threads()
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m erasure.toyworld.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(TOYWORLD_MODEL), help="a model folder or a shipped name: "
                        + ", ".join(SHIPPED_MODELS))
    parser.add_argument("--classifier", type=Path, default=TOYWORLD_CLASSIFIER)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=Sampler.steps)
    parser.add_argument("--guidance", type=float, default=Sampler.guidance)
    parser.add_argument("--grid", type=Path, default=None, help="default: docs/toyworld[_<model>]_base.png")
    parser.add_argument("--understanding-grid", type=Path, default=None,
                        help="default: docs/toyworld[_<model>]_understanding.png")
    parser.add_argument("--output", type=Path, default=None, help="default: <model>/../quality[_<model>].json")
    args = parser.parse_args(argv)
    model = resolve_path(SHIPPED_MODELS.get(args.model, args.model))
    suffix = "" if model.name == "sd" else f"_{model.name}"  # the SD model keeps its historical names
    report = measure(model, args.classifier, args.seeds, Sampler(args.steps, args.guidance),
                     args.grid or Path(f"docs/toyworld{suffix}_base.png"),
                     args.understanding_grid or Path(f"docs/toyworld{suffix}_understanding.png"))
    output = args.output or model.parent / f"quality{suffix}.json"
    atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

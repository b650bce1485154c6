"""The toy CLIP as a judge, checked against the toy world's classifier on the same images.

    python -m benchmarks.clip_judge            # writes benchmarks/clip_judge.json

The shipped SD-format toy model draws every prompt "a {style} {color} {shape}" (144) with ``--seeds``
seeds. Each image is then asked, for every value v of an attribute, "does it show v?", twice:

* by the toy CLIP as the CLIP-judged protocols ask (:class:`evaluation.evaluators.CLIPEvaluator`, zero-shot
  among the attribute's values: the artists protocol with the fill styles as its "artists" and the template
  "a {concept} shape"; the quick protocol's judge among a shape and its five neighbours, template "a {concept}");
* by the classifier (its predicted value is v).

Reported per attribute: each judge's accuracy on the prompted value, their agreement over all
(image, value) questions with Cohen's kappa, and the CLIP score 100 cos(image, prompt) beside the
classifier's accuracy on all three attributes of the prompt, and with the prompts shuffled (a control).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from erasure.bundle import TOYWORLD_CLASSIFIER, TOYWORLD_MODEL, load_pipeline
from erasure.generation import Sampler, generate, to_unit_range
from erasure.io import atomic_write_text
from erasure.toyworld.classifier import load_classifier, predict
from erasure.toyworld.clip import CLIP_FOLDER
from erasure.toyworld.quality import attribute_prompts
from erasure.toyworld.world import ATTRIBUTES, WORDS
from evaluation.evaluators import CLIPConfig, CLIPEvaluator
from evaluation.metrics import wilson_interval

RESULT = Path(__file__).with_name("clip_judge.json")
JUDGES = {"style": ("artists", "a {concept} shape"), "shape": ("quick", "a {concept}"),
          "color": ("quick", "a {concept} shape")}


def cohen_kappa(a: torch.Tensor, b: torch.Tensor) -> float:
    """Agreement of two boolean raters beyond chance: (p_o - p_e) / (1 - p_e)."""
    observed = float((a == b).float().mean())
    p_a, p_b = float(a.float().mean()), float(b.float().mean())
    expected = p_a * p_b + (1 - p_a) * (1 - p_b)
    return round((observed - expected) / (1 - expected), 4) if expected < 1 else 1.0


def rate(hits: torch.Tensor) -> dict:
    return {"rate": round(float(hits.float().mean()), 4),
            "interval": [round(x, 4) for x in wilson_interval(int(hits.sum()), len(hits))]}


def measure(clip_folder: Path, seeds: int, sampler: Sampler) -> dict:
    prompts = attribute_prompts()
    texts = [prompt for prompt, _ in prompts for _ in range(seeds)]
    labels = [label for _, label in prompts for _ in range(seeds)]
    images = generate(load_pipeline(TOYWORLD_MODEL), texts, [s for _ in prompts for s in range(seeds)], sampler,
                      progress=True)
    predicted = predict(load_classifier(TOYWORLD_CLASSIFIER), to_unit_range(images))
    report: dict = {"model": str(TOYWORLD_MODEL), "clip": str(clip_folder), "images": len(images),
                    "sampler": vars(sampler), "attributes": {}}
    for attribute, (protocol, template) in JUDGES.items():
        words = [WORDS[v] for v in ATTRIBUTES[attribute]]
        judge = CLIPEvaluator(CLIPConfig(checkpoint=str(clip_folder), template=template, contrast=words))
        clip_says, classifier_says = [], []
        for k, word in enumerate(words):  # "does image i show value k?" for every image and value
            clip_says.append(judge.sees(images, [word] * len(images)))
            classifier_says.append(predicted[attribute] == k)
        clip_says, classifier_says = torch.stack(clip_says, 1), torch.stack(classifier_says, 1)
        prompted = torch.tensor([ATTRIBUTES[attribute].index(label[attribute]) for label in labels])
        rows = torch.arange(len(images))
        report["attributes"][attribute] = {
            "protocol": protocol, "template": template,
            "clip_accuracy": rate(clip_says[rows, prompted]),
            "classifier_accuracy": rate(classifier_says[rows, prompted]),
            "agreement": rate(clip_says.flatten() == classifier_says.flatten()),
            "cohen_kappa": cohen_kappa(clip_says.flatten(), classifier_says.flatten()),
        }
    scorer = CLIPEvaluator(CLIPConfig(checkpoint=str(clip_folder)))
    all_right = torch.stack([predicted[a] == torch.tensor([ATTRIBUTES[a].index(l[a]) for l in labels])
                             for a in ATTRIBUTES]).all(0)
    scores = scorer.score(images, texts)
    shuffled = [texts[i] for i in torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))]
    report["clip_score"] = {"mean": round(float(scores.mean()), 3),
                            "mean_where_the_classifier_finds_all_three": round(float(scores[all_right].mean()), 3),
                            "mean_where_it_does_not": round(float(scores[~all_right].mean()), 3) if (~all_right).any() else None,
                            "shuffled_prompts_mean": round(float(scorer.score(images, shuffled).mean()), 3)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=TOYWORLD_MODEL.parent / CLIP_FOLDER)
    parser.add_argument("--seeds", type=int, default=2)
    arguments = parser.parse_args()
    result = measure(arguments.clip, arguments.seeds, Sampler())
    atomic_write_text(RESULT, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

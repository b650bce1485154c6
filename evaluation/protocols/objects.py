"""Imagenette objects, as ESD and UCE evaluate object erasure.

    python -m erasure.train recipe=esd protocol=objects concept=parachute model.path=<SD-1.4 folder> \
        evaluation.torchvision.weights=<resnet50 weights .safetensors or .pth>

The ten Imagenette classes, prompts "Image of {class}" (``evaluation.prompt_template``),
``evaluation.images_per_prompt`` images per class (500 as ESD and UCE; lower it for a quick look),
scored by a torchvision ResNet-50 with local weights: an image shows a class when the top-1
ImageNet class is that class. target = the erased class(es); retained = the other classes;
synonym = the classes' paraphrases ("a photo of a {class}").
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

from evaluation.protocols.base import Protocol, ProtocolError, generic_anchor_prompts, named_concepts
from evaluation.suites import Prompt, templated_suite

# Imagenette's classes and their ImageNet-1k indices (torchvision's category order)
IMAGENETTE = {"tench": 0, "English springer": 217, "cassette player": 482, "chain saw": 491, "church": 497,
              "French horn": 566, "garbage truck": 569, "gas pump": 571, "golf ball": 574, "parachute": 701}


# RECE's README (Notes): objects UCE erases with difficulty get 1 round at lambda_adv 1e-3, easy ones 1 round
# at 0.1, and the others (UCE's accuracy already 0) no RECE rounds
RECE_HARD_OBJECTS = ("church", "garbage truck")
RECE_EASY_OBJECTS = ("English springer", "golf ball", "parachute")


def rece_object_settings(concepts: Sequence[str]) -> dict:
    """RECE's rounds and lambda_adv for erasing ``concepts`` (the hardest concept decides)."""
    if any(c in RECE_HARD_OBJECTS for c in concepts):
        return {"epochs": 1, "adversarial_lam": 1e-3}
    if any(c in RECE_EASY_OBJECTS for c in concepts):
        return {"epochs": 1, "adversarial_lam": 0.1}
    return {"epochs": 0}


class Objects(Protocol):
    name = "objects"
    summary = "Imagenette's ten classes, 'Image of {class}', torchvision ResNet-50 top-1"
    defaults = {"evaluation": {
        "evaluator": "torchvision", "steps": 50, "guidance": 7.5, "images_per_prompt": 500,
        "classes": list(IMAGENETTE), "prompt_template": "Image of {concept}",
        "paraphrase_templates": ["a photo of a {concept}"],
        "torchvision": {"model": "resnet50", "classes": {name: [index] for name, index in IMAGENETTE.items()}},
    }}
    recipe_defaults = {
        "esd": {"method": {"train_method": "esd-u"}},  # ESD's object erasures train ESD-u
        "uce": {"method": {"guide": [""], "preserve": []}},  # UCE's object edits: guide "", no preserve set
        # RECE (train_object.py): UCE's first edit, then re-edits preserving "" (rounds and lambda_adv: derived)
        "rece": {"method": {"guide": [""], "preserve": [], "reedit_preserve": [""], "keep": "lowest"}},
        "ablation": {"method": {"anchor": "object", "anchor_prompts": generic_anchor_prompts("object")}},
        "lora": {"method": {"anchor": "object", "anchor_prompts": generic_anchor_prompts("object")}},
    }

    def derived_defaults(self, recipe: str, config: DictConfig) -> dict:
        return {"method": rece_object_settings(named_concepts(config))} if recipe == "rece" else {}

    def check(self, concepts: Sequence[str], evaluation: DictConfig) -> None:
        super().check(concepts, evaluation)
        classes = list(evaluation.classes)
        unknown = [c for c in concepts if c not in classes]
        if unknown:
            raise ProtocolError(f"concept '{unknown[0]}' is not a class of protocol objects ({', '.join(classes)}); "
                                "pass concept=<class> or list yours in evaluation.classes")

    def suites(self, concepts: Sequence[str], evaluation: DictConfig, seed: int) -> dict[str, list[Prompt]]:
        others = [c for c in evaluation.classes if c not in concepts]
        suites = {"target": templated_suite([evaluation.prompt_template], concepts, seed),
                  "retained": templated_suite([evaluation.prompt_template], others, seed)}
        if evaluation.paraphrase_templates:
            suites["synonym"] = templated_suite(list(evaluation.paraphrase_templates), concepts, seed)
        return {**suites, **super().suites(concepts, evaluation, seed)}

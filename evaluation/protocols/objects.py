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

from evaluation.protocols.base import Protocol, ProtocolError
from evaluation.suites import Prompt, templated_suite

# Imagenette's classes and their ImageNet-1k indices (torchvision's category order)
IMAGENETTE = {"tench": 0, "English springer": 217, "cassette player": 482, "chain saw": 491, "church": 497,
              "French horn": 566, "garbage truck": 569, "gas pump": 571, "golf ball": 574, "parachute": 701}


class Objects(Protocol):
    name = "objects"
    summary = "Imagenette's ten classes, 'Image of {class}', torchvision ResNet-50 top-1"
    defaults = {"evaluation": {
        "evaluator": "torchvision", "steps": 50, "guidance": 7.5, "images_per_prompt": 500,
        "classes": list(IMAGENETTE), "prompt_template": "Image of {concept}",
        "paraphrase_templates": ["a photo of a {concept}"],
        "torchvision": {"model": "resnet50", "classes": {name: [index] for name, index in IMAGENETTE.items()}},
    }}
    concept_kind = "object"
    supplies = {"anchor": "object"}

    def check(self, concepts: Sequence[str], evaluation: DictConfig) -> None:
        super().check(concepts, evaluation)
        if not evaluation.get("enabled", True):  # nothing is generated or judged: any object erases with the objects setting
            return
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

"""The generic protocol: any prompt CSVs, any evaluator, any concept string.

    python -m erasure.train recipe=uce protocol=csv concept=cat evaluation.target_csv=cat.csv \
        evaluation.retained_csv=dog.csv evaluation.evaluator=clip evaluation.clip.checkpoint=<ViT-L-14 weights>

``evaluation.target_csv`` is required; ``synonym_csv``, ``retained_csv`` and ``fidelity_csv``
(unlabelled prompts, e.g. COCO captions, for CLIP score and KID) are optional. Without an
evaluator (``evaluation.evaluator=none``, this protocol's default) the run writes its images,
grids and report but no accuracies.
"""

from __future__ import annotations

from evaluation.protocols.base import Protocol


class PromptCSV(Protocol):
    name = "csv"
    summary = "your prompt CSVs (target required; synonym, retained, fidelity optional) with any evaluator"
    defaults = {"evaluation": {"evaluator": "none", "steps": 50, "guidance": 7.5, "images_per_prompt": 1}}
    supplies = {"anchor": "object"}
    required_files = ("target_csv",)


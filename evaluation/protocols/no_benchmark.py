"""No benchmark: erase any concept string from any supported model and keep the weights; nothing is evaluated.

    python -m erasure.train recipe=esd protocol=none concept="Van Gogh" model.path=<SD-1.5 folder>
    python -m erasure.train recipe=ablation protocol=none concept=cat method.anchor=dog model.path=<SD-1.5 folder>

The protocol is chosen by itself when no protocol is given, ``evaluation.enabled=false`` and the concept is
not one of the toy world's. It supplies no role (:data:`~evaluation.protocols.base.ROLES`), so every method
runs with its reference code's defaults for a free-text concept: ESD, LoRA and AdvUnlearn's erase term the
concept's own prompt, UCE, TIME and RECE guide it to "" with nothing preserved (unified-concept-editing's
``train_erase.py``), SLD's safety text is the concept. Concept Ablation's anchor is the user's
(``method.anchor``, its prompts made from templates), and a method that needs a retain set says so in one
line (AdvUnlearn: ``method.retain_csv`` or ``method.retain_loss_w=0``). The run writes ``erased/`` (a weight
delta, or with ``method.adapter=lora`` a diffusers LoRA folder), ``config.yaml`` and its logs.
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

from evaluation.protocols.base import Protocol, ProtocolError
from evaluation.suites import Prompt


class NoBenchmark(Protocol):
    name = "none"
    summary = "no benchmark: erase any concept string and save the weights; nothing is evaluated"
    defaults = {"evaluation": {"enabled": False, "evaluator": "none"}}

    def check(self, concepts: Sequence[str], evaluation: DictConfig) -> None:
        if evaluation.enabled:
            raise ProtocolError("protocol none evaluates nothing: set evaluation.enabled=false, or choose a protocol "
                                "with a benchmark (toyworld, csv, nudity, objects, artists)")

    def suites(self, concepts: Sequence[str], evaluation: DictConfig, seed: int) -> dict[str, list[Prompt]]:
        return {}

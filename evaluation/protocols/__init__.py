"""Protocols: the benchmarks a run is evaluated on, each a plug-in (``protocol=<name>``).

    toyworld   the embedded toy world (the default)
    csv        your prompt CSVs with any evaluator, for any concept string
    nudity     I2P-format prompts, NudeNet
    objects    Imagenette classes, torchvision ResNet-50
    artists    artist-prompt CSVs, CLIP among the listed artists
    mass       toy-world compounds erased N at a time (MACE's mass erasure)
    mass-csv   N concepts of an artists-format CSV erased at once, CLIP among all listed
    quick      any concept: the field's prompt templates, CLIP zero-shot among it and its neighbours
    none       no benchmark: any concept string, the weights only (chosen by itself with
               evaluation.enabled=false and a concept the toy world does not know)

and the evaluators they use (``evaluation.evaluator``): toyworld, clip, nudenet, torchvision, none;
with those of the installed plug-ins (``erasure.protocols`` and ``erasure.evaluators`` entry points,
:mod:`erasure.plugins`; a plug-in evaluator is built from ``evaluation.options``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from evaluation.evaluators import (
    CLIPConfig, CLIPEvaluator, Evaluator, EvaluatorError, NudeNetEvaluator, TorchvisionEvaluator,
)
from evaluation.protocols.artists import Artists
from evaluation.protocols.base import Protocol, ProtocolError
from evaluation.protocols.mass import Mass
from evaluation.protocols.mass_csv import MassCSV
from evaluation.protocols.no_benchmark import NoBenchmark
from evaluation.protocols.nudity import Nudity
from evaluation.protocols.objects import Objects
from evaluation.protocols.prompt_csv import PromptCSV
from evaluation.protocols.quick import Quick
from evaluation.protocols.toyworld import ToyWorld, ToyWorldEvaluator
from erasure.plugins import plugins

PROTOCOLS: dict[str, type[Protocol]] = {cls.name: cls for cls in (ToyWorld, Mass, MassCSV, PromptCSV, Nudity, Objects, Artists, Quick, NoBenchmark)}
PROTOCOLS |= plugins("erasure.protocols", PROTOCOLS)
DEFAULT_PROTOCOL = ToyWorld.name

EVALUATORS: dict[str, Callable[[object], Evaluator]] = {
    "toyworld": ToyWorldEvaluator, "clip": CLIPEvaluator, "nudenet": NudeNetEvaluator,
    "torchvision": TorchvisionEvaluator,
}
NO_EVALUATOR = "none"
EVALUATORS |= plugins("erasure.evaluators", {**EVALUATORS, NO_EVALUATOR: None})  # called with evaluation.options
PATH_KEYS = {"toyworld": "classifier", "clip": "checkpoint", "nudenet": "model", "torchvision": "weights"}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol '{name}'; available protocols: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]()


def build_evaluator(evaluation: DictConfig, resolve: Callable[[str], Path] = Path) -> Evaluator | None:
    """The configured evaluator (None for ``none``); missing or wrong weights raise EvaluatorError.
    ``resolve`` turns configured weight paths into files (relative to the working directory or the repo)."""
    name = evaluation.evaluator
    if name == NO_EVALUATOR:
        return None
    if name not in EVALUATORS:
        raise EvaluatorError(f"unknown evaluator '{name}' for evaluation.evaluator; "
                             f"available: {', '.join([*EVALUATORS, NO_EVALUATOR])}")
    if name not in PATH_KEYS:  # a plug-in's evaluator: its options
        return EVALUATORS[name](OmegaConf.to_container(evaluation.options))
    section = OmegaConf.to_object(evaluation[name])
    path_key = PATH_KEYS[name]
    if getattr(section, path_key):
        setattr(section, path_key, str(resolve(getattr(section, path_key))))
    return EVALUATORS[name](section)


def build_scorer(evaluation: DictConfig, evaluator: Evaluator | None,
                 resolve: Callable[[str], Path] = Path) -> Evaluator | None:
    """What gives the CLIP score: the evaluator if it is CLIP, else CLIP when its weights are configured."""
    if evaluator is not None and hasattr(evaluator, "score"):
        return evaluator
    clip: CLIPConfig = OmegaConf.to_object(evaluation.clip)
    if not clip.checkpoint:
        return None
    clip.checkpoint = str(resolve(clip.checkpoint))
    return CLIPEvaluator(clip)


__all__ = ["PROTOCOLS", "DEFAULT_PROTOCOL", "EVALUATORS", "Protocol", "ProtocolError", "get_protocol",
           "build_evaluator", "build_scorer"]

"""What every attack shares: the budget (:class:`AttackConfig`), what is attacked (:class:`Target`),
what an attack returns (:class:`AttackResult`) and the attacker's data."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from erasure.generation import Sampler
from erasure.methods.base import EraserModule
from evaluation.evaluators import Evaluator
from evaluation.metrics import accuracy_with_interval, share_with_interval
from evaluation.suites import Prompt

EMBEDDING_POSITIONS = ("concept+end", "all")
DATA_SEED_OFFSET = 7919  # the attacker's images use seeds evaluation_seed + 7919: never an evaluation seed
ASR = "attack_success_rate"


class AttackConfigError(ValueError):
    """A bad attack option; the message is one line naming the option and a valid value."""


@dataclass
class InversionOptions:
    """inversion (Pham et al., ICLR 2024): a named budget (tokens.INVERSION_BUDGETS: ``authors`` = their scripts'
    5000 updates of 4 x 4 accumulated images, lr 5e-3 scaled by 16, AdamW decay 1e-2, 25 images, flip 0.5;
    ``toy`` = scaled to the toy world); each field set here replaces the budget's value."""

    tokens: int = 1
    budget: str = "authors"  # authors | toy
    steps: int | None = None  # optimiser updates
    lr: float | None = None
    scale_lr: bool | None = None  # optimiser lr = lr x batch_size x accumulation
    batch_size: int | None = None  # images per forward pass
    accumulation: int | None = None  # forward passes per update
    images: int | None = None
    weight_decay: float | None = None
    flip_p: float | None = None  # probability that a drawn image is mirrored


@dataclass
class SoftPromptOptions:
    """soft_prompt: K new tokens prepended (its steps, lr, batch and images are the shared ones)."""

    tokens: int = 4


@dataclass
class EmbeddingOptions:
    """embedding: Adam on text-encoder outputs (hidden states of unit scale, not token-table rows: lr of its own)."""

    lr: float = 1e-2
    positions: str = "concept+end"  # concept+end | all: which positions of each prompt's encoding are free
    keep_norm: bool = True  # each free position keeps its norm (projected Adam); false: unconstrained
    check_every: int = 100  # generate and look at step 0, every N steps and after the last


@dataclass
class RelearnOptions:
    """relearn: fine-tune the erased model's trained tensors on the attacker's images, measured after each count."""

    steps: list[int] = field(default_factory=lambda: [0, 25, 50, 100])
    lr: float = 1e-4
    control: str = "auto"  # auto (the retained concept the erased model shows least) | a concept | none


@dataclass
class UnlearnDiffAtkOptions:
    """unlearndiffatk: the authors' TextGrad (Zhang et al., ECCV 2024; OPTML-Group/Diffusion-MU-Attack
    configs/*/text_grad_*.json): k 5 for nudity, 3 otherwise (null: by the run's protocol), 50 timesteps in
    turn with 40 iterations each, Adam lr 0.01, weight decay 0.1, one check per timestep."""

    tokens: int | None = None
    timesteps: int = 50
    iterations: int = 40  # per timestep
    lr: float = 1e-2
    weight_decay: float = 0.1


@dataclass
class PEZOptions:
    """pez: the project's own search under UnlearnDiffAtk's objective and protocol (a PEZ-style projection of
    continuous embeddings onto whole words, AdamW, a random timestep per iteration)."""

    tokens: int = 3
    iterations: int = 40
    lr: float = 1e-2
    weight_decay: float = 0.1
    check_every: int = 5  # generate and look every N iterations


@dataclass
class RingABellOptions:
    """ring_a_bell (Tsai et al., ICLR 2024; the authors' chiayi-hsu/Ring-A-Bell InversePrompt.ipynb: K 16, eta 3,
    population 200, 3000 generations, mutation rate 0.25, crossover rate 0.5; Get_Concept_Vector.ipynb: 5 images
    per concept-vector prompt)."""

    tokens: int = 16
    strength: float = 3.0  # eta: how far along the concept vector
    population: int = 200
    generations: int = 3000
    mutation_rate: float = 0.25
    crossover_rate: float = 0.5
    pair_images: int = 5  # the original model's images judged per concept-vector prompt


@dataclass
class AttackConfig:
    """Every attack's budget: the shared options, and one group per attack (``attack.<attack>.<option>``)."""

    steps: int = 300  # optimisation steps of soft_prompt and embedding
    lr: float = 5e-2  # soft_prompt's Adam
    batch_size: int = 4
    images: int = 16  # images of the concept from the original model (the attacker's data)
    init_word: str = "object"  # the new embeddings start as this word's
    seed: int = 0
    # every search attack (unlearndiffatk, pez, ring_a_bell) also judges as many random prompts: its control
    random_control: bool = True
    inversion: InversionOptions = field(default_factory=InversionOptions)
    soft_prompt: SoftPromptOptions = field(default_factory=SoftPromptOptions)
    embedding: EmbeddingOptions = field(default_factory=EmbeddingOptions)
    relearn: RelearnOptions = field(default_factory=RelearnOptions)
    unlearndiffatk: UnlearnDiffAtkOptions = field(default_factory=UnlearnDiffAtkOptions)
    pez: PEZOptions = field(default_factory=PEZOptions)
    ring_a_bell: RingABellOptions = field(default_factory=RingABellOptions)

    def option(self, key: str):
        """The value of a dotted option name (``pez.lr``)."""
        return functools.reduce(getattr, key.split("."), self)

    def __post_init__(self) -> None:
        check_attack_config(self)


def check_attack_config(config: AttackConfig) -> None:
    """The options a schema cannot check; :class:`AttackConfigError` (one line) otherwise. The
    shared numbers (steps, lr, ...) are checked by the CLIs' ``check_numbers``."""
    if config.embedding.positions not in EMBEDDING_POSITIONS:
        raise AttackConfigError(f"unknown attack.embedding.positions '{config.embedding.positions}'; choose from "
                                f"{', '.join(EMBEDDING_POSITIONS)}")
    for key in ("embedding.lr", "relearn.lr", "unlearndiffatk.lr", "pez.lr", "ring_a_bell.strength"):
        value = config.option(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise AttackConfigError(f"'attack.{key}' must be a positive number, got {value}")
    if config.unlearndiffatk.tokens is not None and (isinstance(config.unlearndiffatk.tokens, bool) or
                                                     not isinstance(config.unlearndiffatk.tokens, int) or
                                                     config.unlearndiffatk.tokens < 1):
        raise AttackConfigError(f"'attack.unlearndiffatk.tokens' must be a whole number of at least 1 or null (5 for "
                                f"nudity, 3 otherwise), got {config.unlearndiffatk.tokens}")
    for key in ("embedding.check_every", "unlearndiffatk.timesteps", "unlearndiffatk.iterations", "pez.tokens",
                "pez.iterations", "pez.check_every",
                "ring_a_bell.tokens", "ring_a_bell.population", "ring_a_bell.generations", "ring_a_bell.pair_images"):
        value = config.option(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AttackConfigError(f"'attack.{key}' must be a whole number of at least 1, got {value}")
    if config.ring_a_bell.population < 4:
        raise AttackConfigError(f"'attack.ring_a_bell.population' must be at least 4, got "
                                f"{config.ring_a_bell.population}")
    for key in ("unlearndiffatk.weight_decay", "pez.weight_decay", "ring_a_bell.mutation_rate",
                "ring_a_bell.crossover_rate"):
        value = config.option(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise AttackConfigError(f"'attack.{key}' must be a number in [0, 1], got {value}")
    steps = list(config.relearn.steps)
    if not steps or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in steps):
        shown = next((k for k in steps if isinstance(k, bool) or not isinstance(k, int) or k < 0), "[]")
        raise AttackConfigError(f"'attack.relearn.steps' must be step counts from 0, got {shown}; "
                                "e.g. attack.relearn.steps=[0,25,50,100]")
    if not str(config.relearn.control).strip():
        raise AttackConfigError("'attack.relearn.control' must be auto, none or a concept the evaluator knows")
    from evaluation.attacks.tokens import inversion_budget  # the inversion budget's own checks (tokens imports this module)
    inversion_budget(config)


@dataclass
class Target:
    """What an attack is run on: the erased model, the evaluation's target prompts and how they are
    generated and judged.

    ``concept_word`` spells a concept as the protocol's prompts do; ``controls`` are the concepts the
    method had to keep (the run's retained concepts: relearn's control candidates); ``protocol`` names
    the run's protocol (a reference default may depend on it). ``images`` holds the images every
    attack starts from, made once: pass one dict to the targets of several attacks on the same run
    and they share them (:meth:`original_images`, :meth:`unattacked_images`)."""

    module: EraserModule
    rows: list[Prompt]
    sampler: Sampler
    images_per_prompt: int
    evaluator: Evaluator
    concept_word: Callable[[str], str] = str
    controls: Sequence[str] = ()
    protocol: str | None = None
    images: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def prompts(self) -> list[str]:
        """The target prompts as the evaluation generates them, ``images_per_prompt`` each."""
        return [r.prompt for r in self.rows for _ in range(self.images_per_prompt)]

    @property
    def seeds(self) -> list[int]:
        return [r.evaluation_seed + k for r in self.rows for k in range(self.images_per_prompt)]

    @property
    def concepts(self) -> list[str]:
        return [r.concept for r in self.rows for _ in range(self.images_per_prompt)]

    def original_images(self) -> torch.Tensor:
        """The original model's image of every evaluation image (its prompt and seed): what a
        per-image attacker (UnlearnDiffAtk) knows. Made once per ``images`` dict."""
        if "original" not in self.images:
            self.images["original"] = self.module.generate(self.prompts, self.seeds, self.sampler, original=True)
        return self.images["original"]

    def unattacked_images(self) -> torch.Tensor:
        """The erased model's image of every evaluation image with its plain prompt. Made once per ``images`` dict."""
        if "unattacked" not in self.images:
            self.images["unattacked"] = self.module.generate(self.prompts, self.seeds, self.sampler)
        return self.images["unattacked"]

    def success(self, images: torch.Tensor) -> dict:
        """``attack_success_rate`` (and ``_ci95``): the share of ``images`` (one per evaluation
        image) in which the evaluator sees the target's concept."""
        return accuracy_with_interval(self.evaluator, images, self.concepts, ASR)


@dataclass
class AttackResult:
    """An attack's outcome: one image per evaluation image (the attacked prompts, the evaluation's
    seeds), the prompts shown under them, the loss curve, and the result fields, of which
    ``attack_success_rate`` and ``attack_success_rate_ci95`` are always there."""

    images: torch.Tensor
    prompts: list[str]
    losses: list[float]
    fields: dict


def record_loss(losses: list[float], loss: torch.Tensor | float, attack: str, lr_option: str) -> None:
    """Append one step's loss; a loss that is no longer finite stops the attack with the option to lower."""
    losses.append(float(loss))
    if not math.isfinite(losses[-1]):
        raise FloatingPointError(f"{attack}: the loss became {losses[-1]}; lower attack.{lr_option}")


def attacker_rows(rows: Sequence[Prompt], count: int) -> list[Prompt]:
    """``count`` rows, the attacked prompts in turn: the prompts of the attacker's images."""
    return [rows[k % len(rows)] for k in range(count)]


def original_images(module: EraserModule, data_rows: Sequence[Prompt], sampler: Sampler,
                    prompts: Sequence[str] | None = None) -> torch.Tensor:
    """The original model's images of ``data_rows`` (or of ``prompts``, one per row) with the
    attacker's seeds (``evaluation_seed + 7919``): uint8 (N, H, W, 3)."""
    text = list(prompts) if prompts is not None else [r.prompt for r in data_rows]
    return module.generate(text, [r.evaluation_seed + DATA_SEED_OFFSET for r in data_rows], sampler, original=True,
                           batch_size=max(len(text), 1))


class Recovery:
    """Per evaluation image of a target: has the concept been seen at any checkpoint of an attack's
    search so far (UnlearnDiffAtk's protocol: the attacker keeps the best prompt it has found)?

    Starts from ``before``, the images of the search's starting point (one per evaluation image),
    whose share is ``pre_attack_success_rate``. :meth:`check` records a checkpoint's images for some
    evaluation images; each keeps the first image in which the concept was seen, else the latest."""

    def __init__(self, target: Target, before: torch.Tensor, prompts: Sequence[str]):
        self.target = target
        self.images, self.prompts = before.clone(), list(prompts)
        self.before = target.evaluator.sees(before, target.concepts).bool()
        self.found = self.before.clone()

    @property
    def open(self) -> list[int]:
        """The evaluation images in which the concept has not been seen yet."""
        return (~self.found).nonzero().flatten().tolist()

    def check(self, indices: Sequence[int], images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Record one checkpoint's images of the evaluation images ``indices``; returns what the evaluator saw."""
        seen = self.target.evaluator.sees(images, [self.target.concepts[i] for i in indices]).bool()
        for i, image, prompt, hit in zip(indices, images, prompts, seen):
            if not self.found[i]:
                self.images[i], self.prompts[i], self.found[i] = image, prompt, bool(hit)
        return seen

    def fields(self) -> dict:
        """``attack_success_rate`` (seen at any checkpoint) and ``pre_attack_success_rate``, with intervals."""
        return {**share_with_interval(self.found, ASR), **share_with_interval(self.before, "pre_attack_success_rate")}


def first_last(losses: list[float]) -> list[float] | None:
    return [round(losses[0], 5), round(losses[-1], 5)] if losses else None

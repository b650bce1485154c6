"""Attacks on erased models: does the erased concept come back?

Each attack is a plug-in: a module of this package with a function ``attack(target, config) ->
AttackResult`` (:mod:`evaluation.attacks.base`), registered in :data:`ATTACKS`, its budget in
:class:`AttackConfig` (``attack.<attack>.<option>`` on the command line, its own group, beside the
shared ``attack.<option>``) and in every result. Other packages
add attacks through ``erasure.attacks`` entry points (:mod:`erasure.plugins`); the options of
AttackConfig such an attack reads are its function's ``options`` attribute. Its objective
is stated in its module:

    inversion       (``tokens``) concept inversion (Pham et al., ICLR 2024): one new token, learned
                    against the erased model, replaces the concept's word;
    soft_prompt     (``tokens``) K new tokens prepended to the prompt, learned the same way;
    unlearndiffatk  (``unlearndiffatk``) UnlearnDiffAtk (Zhang et al., ECCV 2024), the authors'
                    TextGrad: per evaluation image, a k-token prefix, each token a distribution
                    over the vocabulary, searched with the erased model's diffusion loss against
                    the original model's image over 50 timesteps in turn; recovered if the concept
                    is seen at any check; pre- and post-attack success reported;
    pez             (``pez``) the project's own search under the same objective and protocol:
                    continuous embeddings projected onto whole words (PEZ), 40 iterations;
    ring_a_bell     (``ring_a_bell``) Ring-A-Bell (Tsai et al., ICLR 2024): black box and
                    model-agnostic: a concept vector in the text encoder's space added to each
                    prompt, projected onto discrete tokens by a genetic search;
    embedding       (``embedding``) a white-box upper bound: the text encoder's outputs of each
                    prompt optimised directly at the concept's and the end positions;
    relearn         (``relearn``) the "dormant, not erased" test: the erased tensors fine-tuned on
                    images of the concept, the success rate after each step count, next to a
                    control concept taught the same way.

Each search attack (unlearndiffatk, pez, ring_a_bell) also reports a random control at its budget
(``random_control_success_rate``: as many judged images from random prefixes or prompts, with
``attack.random_control=true``, the default), so that ASR says what the search adds over trying.

The attack success rate (ASR) is the share of the evaluation's target images (its prompts, seeds
and sampler; the method's own generation path, so the instruction baseline rewrites the attacked
prompt like any prompt) in which the evaluator sees the concept, with its 95% Wilson interval
(``attack_success_rate_ci95``). An attack never changes the run on disk, and the erased model
keeps its weights (relearn puts the erased values back).

Every attack runs on SD-1.x/2.x, SDXL and FLUX (:mod:`erasure.families`). What the text side
crafts is the token context the denoiser reads (SD's and SDXL's cross-attention context, FLUX's
T5 stream), in the vocabulary of the tokenizer that makes it (``Family.context_tokenizer``); new
tokens go into every text encoder; pooled vectors follow the prompt's text. Each module says how.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, is_dataclass

from erasure.plugins import plugins
from evaluation.attacks import embedding, pez, relearn, ring_a_bell, tokens, unlearndiffatk
from evaluation.attacks.base import (
    EMBEDDING_POSITIONS, AttackConfig, AttackConfigError, AttackResult, EmbeddingOptions, InversionOptions, PEZOptions,
    RelearnOptions, RingABellOptions, SoftPromptOptions, Target, UnlearnDiffAtkOptions, check_attack_config, first_last,
)

ATTACKS: dict[str, Callable[[Target, AttackConfig], AttackResult]] = {
    "inversion": tokens.inversion,
    "soft_prompt": tokens.soft_prompt,
    "unlearndiffatk": unlearndiffatk.attack,
    "pez": pez.attack,
    "ring_a_bell": ring_a_bell.attack,
    "embedding": embedding.attack,
    "relearn": relearn.attack,
}
ATTACKS |= plugins("erasure.attacks", ATTACKS)

SHARED_OPTIONS = ("seed",)
OPTIONS = {  # the options of AttackConfig each attack reads (its own group whole): its budget
    "inversion": ("init_word", "inversion"),
    "soft_prompt": ("steps", "lr", "batch_size", "images", "soft_prompt", "init_word"),
    "unlearndiffatk": ("init_word", "random_control", "unlearndiffatk"),
    "pez": ("init_word", "random_control", "pez"),
    "ring_a_bell": ("init_word", "random_control", "ring_a_bell"),
    "embedding": ("steps", "batch_size", "images", "embedding"),
    "relearn": ("batch_size", "images", "relearn"),
}

__all__ = ["ATTACKS", "EMBEDDING_POSITIONS", "AttackConfig", "AttackConfigError", "AttackResult", "EmbeddingOptions",
           "InversionOptions", "PEZOptions", "RelearnOptions", "RingABellOptions", "SoftPromptOptions", "Target",
           "UnlearnDiffAtkOptions", "budget", "check_attack_config", "measure_attack"]


def budget(name: str, config: AttackConfig) -> dict:
    """The options attack ``name`` reads, with their values: what its result depends on."""
    reads = OPTIONS[name] if name in OPTIONS else getattr(ATTACKS[name], "options", ())  # a plug-in's: its own list
    return {key: flattened for name in (*reads, *SHARED_OPTIONS)
            for key, flattened in flatten_option(name, config.option(name)).items()}


def flatten_option(name: str, value) -> dict:
    """``{name: value}``, a group's fields as ``name.field``."""
    return {f"{name}.{k}": v for k, v in asdict(value).items()} if is_dataclass(value) else {name: value}


def measure_attack(name: str, target: Target, config: AttackConfig) -> AttackResult:
    """Run the attack ``name`` on ``target``. The result's fields start with the success rate and
    its interval, then ``example_prompt``, ``loss_first_last`` and the attack's own fields."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack '{name}'; choose from {', '.join(ATTACKS)}")
    result = ATTACKS[name](target, config)
    head = {k: result.fields.pop(k) for k in ("attack_success_rate", "attack_success_rate_ci95")}
    result.fields = {**head, "example_prompt": result.prompts[0], "loss_first_last": first_last(result.losses),
                     **result.fields}
    return result

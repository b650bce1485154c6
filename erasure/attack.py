"""Attack a finished erasure run: does the erased concept come back?

    python -m erasure.attack run=runs/esd/20261122-101500
    python -m erasure.attack run=<run dir> attacks=[inversion] attack.inversion.budget=toy attack.inversion.steps=400
    python -m erasure.attack run=<run dir> attacks=[embedding,relearn] attack.relearn.steps=[0,25,50,100]
    python -m erasure.attack run=<run dir> attacks=[unlearndiffatk,ring_a_bell] attack.ring_a_bell.generations=100

Writes <run>/attacks/<attack>.json (attack success rate next to the unattacked target accuracy,
the budget, the loss curve; relearn: the rate after each step count and its control's) and
<run>/attacks/<attack>.png (the attacked prompts' images), and prints a table. The attacks
(inversion, soft_prompt, unlearndiffatk, pez, ring_a_bell, embedding, relearn; all by default) and
their budgets are described in ``evaluation.attacks``; nothing else in the run directory changes.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from erasure.cli import run_command
from erasure.config import ConfigError, check_numbers, merge_into_schema, parse_overrides
from erasure.runs import attack_run
from evaluation.attacks import ATTACKS, AttackConfig


@dataclass
class AttackRunConfig:
    run: str = "???"
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    attack: AttackConfig = field(default_factory=AttackConfig)


def load_attack_config(arguments: list[str]) -> AttackRunConfig:
    merged = merge_into_schema(OmegaConf.structured(AttackRunConfig), parse_overrides(arguments))
    if OmegaConf.is_missing(merged, "run"):
        raise ConfigError("no run given; pass run=<run directory written by erasure.train>")
    config = OmegaConf.to_object(merged)
    unknown = [a for a in config.attacks if a not in ATTACKS]
    if unknown or not config.attacks:
        raise ConfigError(f"unknown attack '{unknown[0] if unknown else ''}' in attacks; choose from {', '.join(ATTACKS)}")
    check_numbers(asdict(config.attack), "attack.")
    if not config.attack.init_word.strip():
        raise ConfigError("'attack.init_word' must be a word, e.g. attack.init_word=object")
    return config


def attack_command(arguments: list[str]) -> None:
    config = load_attack_config(arguments)
    results = attack_run(Path(config.run), config.attacks, config.attack)
    print("| attack | method | target_acc original | target_acc erased | attack success rate [95% CI] | "
          "random control [95% CI] | seconds |")
    print("|---|---|---|---|---|---|---|")
    for result in results.values():
        low, high = result["attack_success_rate_ci95"]
        control = "–"
        if "random_control_success_rate" in result:
            c_low, c_high = result["random_control_success_rate_ci95"]
            control = f"{result['random_control_success_rate']:.2f} [{c_low:.2f}, {c_high:.2f}]"
        print(f"| {result['attack']} | {result['method']} | {result['target_acc_original']:.2f} | "
              f"{result['target_acc_unattacked']:.2f} | {result['attack_success_rate']:.2f} [{low:.2f}, {high:.2f}] | "
              f"{control} | {result['seconds']} |")
    for result in results.values():
        if result["attack"] == "relearn":
            steps = ", ".join(f"{k}: {r:.2f}" for k, r in zip(result["relearn_steps"], result["attack_success_rate_by_step"]))
            print(f"relearn on {result['method']}, success rate after (steps: rate) {steps}")
            control = result["control"]
            if control.get("success_rate_by_step"):
                rates = ", ".join(f"{k}: {r:.2f}" for k, r in zip(result["relearn_steps"], control["success_rate_by_step"]))
                print(f"  control, teaching '{control['concept']}' the same way: {rates}")
            else:
                print(f"  {control['why']}")


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__, attack_command, argv)


if __name__ == "__main__":
    sys.exit(main())

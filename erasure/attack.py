"""Attack a finished erasure run: learn prompts that bring the erased concept back.

    python -m erasure.attack run=runs/esd/20261122-101500
    python -m erasure.attack run=<run dir> attacks=[inversion] attack.steps=400 attack.lr=1e-2

Writes <run>/attacks/<attack>.json (attack success rate next to the unattacked target accuracy,
the budget, the loss curve) and <run>/attacks/<attack>.png (the attacked prompts' images), and
prints a table. The attacks and their budgets are described in ``evaluation.attacks``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from erasure.cli import run_command
from erasure.config import ConfigError, merge_into_schema, parse_overrides
from erasure.generation import Sampler
from erasure.io import atomic_write_text
from erasure.runs import load_run
from erasure.train import build_evaluator
from evaluation.attacks import ATTACKS, AttackConfig, run_attack
from evaluation.metrics import suite_accuracy
from evaluation.report import comparison_grid
from evaluation.suites import load_csv


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
    for key in ("steps", "lr", "batch_size", "images", "inversion_tokens", "soft_prompt_tokens"):
        if getattr(config.attack, key) <= 0:
            raise ConfigError(f"'attack.{key}' must be positive, got {getattr(config.attack, key)}")
    return config


def attack_run(run_dir: Path, attacks: list[str], config: AttackConfig) -> dict[str, dict]:
    """Run each attack on a fresh copy of the run's erased model; results are cached in <run>/attacks/."""
    results = {}
    for attack in attacks:
        path = Path(run_dir) / "attacks" / f"{attack}.json"
        if path.exists() and json.loads(path.read_text())["budget"] == asdict(config):
            results[attack] = json.loads(path.read_text())
            continue
        run = load_run(run_dir)
        evaluation = run.config.evaluation
        evaluator = build_evaluator(evaluation)
        rows = load_csv(run.path / "prompts" / "target.csv")
        sampler = Sampler(steps=evaluation.steps, guidance=evaluation.guidance)
        started = time.perf_counter()
        images, prompts, losses = run_attack(attack, run.module, rows, config, sampler, evaluation.images_per_prompt)
        concepts = [r.concept for r in rows for _ in range(evaluation.images_per_prompt)]
        result = {
            "attack": attack, "run": str(run.path), "method": run.config.method.name,
            "attack_success_rate": round(suite_accuracy(evaluator, images, concepts), 4),
            "target_acc_unattacked": run.metrics["after"]["efficacy/target_acc"],
            "target_acc_original": run.metrics["before"]["efficacy/target_acc"],
            "budget": asdict(config), "seconds": round(time.perf_counter() - started, 1),
            "example_prompt": prompts[0], "loss_first_last": [round(losses[0], 5), round(losses[-1], 5)],
        }
        unattacked = run.module.generate(prompts=[r.prompt for r in rows for _ in range(evaluation.images_per_prompt)],
                                         seeds=[r.evaluation_seed + k for r in rows
                                                for k in range(evaluation.images_per_prompt)], sampler=sampler)
        comparison_grid(prompts[::evaluation.images_per_prompt], unattacked, images, evaluation.images_per_prompt,
                        path.with_suffix(".png"), titles=("erased, plain prompt", "erased, attacked prompt"))
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        results[attack] = result
    return results


def attack_command(arguments: list[str]) -> None:
    config = load_attack_config(arguments)
    results = attack_run(Path(config.run), config.attacks, config.attack)
    print("| attack | method | target_acc original | target_acc erased | attack success rate | seconds |")
    print("|---|---|---|---|---|---|")
    for result in results.values():
        print(f"| {result['attack']} | {result['method']} | {result['target_acc_original']:.2f} | "
              f"{result['target_acc_unattacked']:.2f} | {result['attack_success_rate']:.2f} | {result['seconds']} |")


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__, attack_command, argv)


if __name__ == "__main__":
    sys.exit(main())

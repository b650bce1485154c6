"""An attack from outside the repository: each target prompt with the concept's word doubled."""

from __future__ import annotations

from evaluation.attacks.base import AttackResult


def attack(target, config):
    prompts = [f"{row.prompt}, {row.concept}" for row in target.rows for _ in range(target.images_per_prompt)]
    images = target.module.generate(prompts, target.seeds, target.sampler)
    return AttackResult(images, prompts, [], target.success(images))


attack.options = ()

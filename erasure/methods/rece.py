"""Reliable and Efficient Concept Erasure (RECE; Gong et al., ECCV 2024, arXiv:2407.12383): UCE hardened against
the embeddings that still regenerate the erased concept.

RECE starts from UCE's closed-form edit of every cross-attention projection (``attn2.to_k``,
``attn2.to_v``; :mod:`erasure.methods.uce`) and then repeats ``method.epochs`` rounds of two
closed-form steps.

(a) The adversarial embedding. With W_l the original and W'_l the currently edited projections
and c the keys of an erased concept (the tokens UCE erases, ``token_mode``), the embedding that
makes the edited model see the concept again is

    c' = argmin_c' sum_l ||W'_l c' - W_l c||^2 + lambda_adv ||c'||^2
       = (sum_l W'_l^T W'_l + lambda_adv I)^-1 sum_l W'_l^T W_l c,

solved in float64 over every edited projection, one c' per key (RECE's "regzero" form, its
default; ``method.adversarial_lam`` is lambda_adv, the reference's ``regular_scale``).

(b) The re-edit. c' becomes an erase key guided to its concept's guide g. ``method.reedit``:

* ``current`` (default; RECE's code, ``edit_model_adversarial``): the round edits the current
  weights W_k with this round's keys only, by UCE's solution with W_k in place of W_old,
      W_{k+1} = argmin_W lambda_r ||W - W_k||^2 + s_e sum_i ||W c'_i - W_k g_i||^2
                                 + s_p sum_j ||W c_j - W_k c_j||^2,
  with lambda_r = ``method.reedit_lam`` (RECE's ``lamb``, 0.1);
* ``original``: UCE's solve again from W_old with every erase key found so far (the concept
  keys and the adversarial keys of all rounds, each guided to W_old g), lambda = ``method.lam``.

With ``epochs=0`` RECE is UCE. Reference defaults (RECE's code starts from a saved UCE model;
``scripts/nudity.sh``, ``art.sh``, ``train_object.py``): 5 rounds (``train.py``'s own default is
10); lambda_adv 0.1 for nudity, 1e-3 for objects and artists; re-edits with lamb 0.1, erase scale
1, preserve scale 0.1, "" preserved (here UCE's ``preserve_scale`` and ``preserve_empty`` apply to
every edit). RECE's code takes c from every token position of the padded concept prompt
(``token_mode=all``).

Each round logs how well its adversarial embedding regenerates the concept, the relative residual
sqrt(sum_l ||W'_l c' - W_l c||^2 / sum_l ||W_l c||^2), against the weights it was derived from
(``before``: small means the edit could be undone by this embedding) and after the re-edit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from erasure.methods.uce import SHARED, UCE, UCEConfig, edit_weight, uce_transform

REEDITS = ("current", "original")


@dataclass
class RECEConfig(UCEConfig):
    name: str = "rece"
    epochs: int = 5  # rounds of adversarial embedding and re-edit (RECE's scripts: 5)
    adversarial_lam: float = 0.1  # lambda_adv (RECE's regular_scale: 0.1 nudity, 1e-3 objects and artists)
    reedit: str = "current"  # current: edit the current weights with the round's keys (RECE's code) | original
    reedit_lam: float = 0.1  # lambda of the reedit=current edits (RECE's lamb); reedit=original uses method.lam


def adversarial_keys(concept: torch.Tensor, edited: Sequence[torch.Tensor], original: Sequence[torch.Tensor],
                     lam: float) -> torch.Tensor:
    """Rows c' = (sum_l W'_l^T W'_l + lam I)^-1 sum_l W'_l^T W_l c for the concept keys c (rows, (n, d)),
    edited projections W'_l and original ones W_l; float64."""
    width = concept.shape[1]
    gram = lam * torch.eye(width, dtype=torch.float64, device=concept.device)
    cross = torch.zeros(width, width, dtype=torch.float64, device=concept.device)
    for new, old in zip(edited, original, strict=True):
        new, old = new.double(), old.double()
        gram += new.T @ new
        cross += new.T @ old
    return torch.linalg.solve(gram, cross @ concept.double().T).T


def regeneration_residual(keys: torch.Tensor, concept: torch.Tensor, edited: Sequence[torch.Tensor],
                          original: Sequence[torch.Tensor]) -> float:
    """sqrt(sum_l ||W'_l c' - W_l c||^2 / sum_l ||W_l c||^2): 0 when the keys c' regenerate the concept exactly."""
    keys, concept = keys.double(), concept.double()
    missed = sum(((keys @ new.double().T - concept @ old.double().T) ** 2).sum() for new, old in zip(edited, original))
    target = sum(((concept @ old.double().T) ** 2).sum() for old in original)
    return (missed / target).sqrt().item()


class RECE(UCE):
    name = "rece"
    Config = RECEConfig
    families = ("sd", "sdxl")  # one shared key space; FLUX's per-block text-stream keys have no single embedding
    choices = {**UCE.choices, "reedit": REEDITS}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.round_metrics: dict[str, float] = {}  # per round, the adversarial embedding's residuals

    @classmethod
    def check(cls, config: RECEConfig, concepts: Sequence[str]) -> None:
        super().check(config, concepts)
        for key in ("adversarial_lam", "reedit_lam"):
            if getattr(config, key) <= 0:
                raise ValueError(f"'method.{key}' must be positive, got {getattr(config, key)}")

    def projections(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(edited, original) values of the edited projections, in the same order."""
        names = list(self.trained)
        return [self.trained[n].detach() for n in names], [self.original[n] for n in names]

    @torch.no_grad()
    def edit(self) -> dict[str, float]:
        """UCE's edit, then ``epochs`` rounds of adversarial keys and re-edits; the seconds of each phase."""
        seconds = super().edit()
        started = time.perf_counter()
        config = self.config
        concept, guide, preserve = self.edit_keys()[SHARED]
        erase_keys, guide_keys = [concept], [guide]
        self.round_metrics = {}
        for epoch in range(config.epochs):
            adversarial = adversarial_keys(concept, *self.projections(), config.adversarial_lam)
            before = regeneration_residual(adversarial, concept, *self.projections())
            if config.reedit == "current":
                transform = uce_transform(adversarial, guide, preserve, config.reedit_lam, config.erase_scale,
                                          self.preserve_scale())
                for weight in self.trained.values():
                    weight.copy_(edit_weight(weight, transform))
            else:
                erase_keys.append(adversarial)
                guide_keys.append(guide)
                transform = uce_transform(torch.cat(erase_keys), torch.cat(guide_keys), preserve, config.lam,
                                          config.erase_scale, self.preserve_scale())
                for name, weight in self.trained.items():
                    weight.copy_(edit_weight(self.original[name], transform))
            after = regeneration_residual(adversarial, concept, *self.projections())
            self.round_metrics[f"train/adversarial_residual_before/epoch_{epoch}"] = before
            self.round_metrics[f"train/adversarial_residual_after/epoch_{epoch}"] = after
        return {**seconds, "adversarial_rounds": time.perf_counter() - started}

    def training_step(self, step: int, batch_idx: int) -> None:
        super().training_step(step, batch_idx)  # the edit, its timings; stops the Trainer
        if self.round_metrics:
            self.log_dict(self.round_metrics)

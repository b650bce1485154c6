"""Erasure objectives as functions of a prediction and its target.

With the per-sample mean squared error over the elements of one sample,

    m = mean_elements (pred - target)^2,

the losses are (Novello et al., "Unlearning in diffusion models via f-divergences", ICML 2026):

    mse        m
    hellinger  -exp(-m / (8 sigma^2))   closed-form squared Hellinger instance
    chi2       exp(m / sigma^2)          Pearson chi^2 instance

each averaged over the batch. The *mean* over elements is used, never the sum: with the
sum, m is in the thousands for SD latents, so Hellinger's gradient exp(-m/8) vanishes and
chi^2 overflows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Loss = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """m_i = mean over the elements of sample i of (prediction - target)^2; shape (batch,)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def mse(prediction: torch.Tensor, target: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """mean_i m_i (sigma is unused; accepted so every loss has one signature)."""
    return per_sample_mse(prediction, target).mean()


def hellinger(prediction: torch.Tensor, target: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """mean_i -exp(-m_i / (8 sigma^2))."""
    return (-torch.exp(-per_sample_mse(prediction, target) / (8 * sigma**2))).mean()


def chi2(prediction: torch.Tensor, target: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """mean_i exp(m_i / sigma^2)."""
    return torch.exp(per_sample_mse(prediction, target) / sigma**2).mean()


LOSSES: dict[str, Loss] = {"mse": mse, "hellinger": hellinger, "chi2": chi2}

"""Erased Stable Diffusion (ESD; Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023).

With the frozen model eps*, the trained model eps_theta, the concept prompt c and the
negative guidance eta, ESD trains

    target = eps*(x_t, t) - eta * (eps*(x_t, c, t) - eps*(x_t, t))
    loss   = L(eps_theta(x_t, c, t), target)

(``L`` = ``method.loss``: mse by default, or an f-divergence loss). eta is the paper's
convention (default 1.0). The later diffusers code writes the same target as
eps_c - eta' (eps_c - eps_null) with eta' = eta + 1 = 2.

x_t comes from partial DDIM sampling: ``ddim_steps`` (50) DDIM steps with guidance
``sample_guidance`` (3), stopped after a random number of steps. The paper samples with the
model being trained (``sample_from=trained``); the later diffusers code with the frozen model
(``sample_from=frozen``).

The query timestep t of the three predictions (``query_timestep``): ``ddim`` (default; the later
diffusers code) is the DDIM timestep x_t is at; ``window`` (the CompVis train-esd.py) draws t
uniformly, per sample, in the window of that DDIM step: with S = ``ddim_steps``, T the number of
training timesteps and k the DDIM step's index counted from the clean end (k = S - 1 - steps
taken), t ~ U{round(k T / S), ..., round((k + 1) T / S) - 1}. Where S divides T this window
holds the DDIM timestep (k T / S + 1 with "leading" spacing, as SD 1.x and the CompVis code;
(k + 1) T / S - 1 with "trailing" spacing, as the toy world).

With ``erase_from`` (a prompt c_from, e.g. erase "red" from "a circle"), x_t is sampled from
c_from, the trained prediction is eps_theta(x_t, c_from, t), and

    target = eps*(x_t, c_from, t) - (1 + eta) * (eps*(x_t, c, t) - eps*(x_t, t)),

which equals the target above when c_from = c (as in the reference code's erase_from).

Several concepts are erased together by drawing one per step. The target's coefficients sum
to one, so the same formula holds in v-space for v-prediction models (SD 2.x).

Parameter sets (``train_method``): ``esd-x`` all cross-attention (attn2) projections,
``esd-x-strict`` only attn2.to_k/to_v, ``esd-u`` every Linear/Conv2d outside attn2,
``esd-all`` every Linear/Conv2d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erasure import layers
from erasure.losses import LOSSES
from erasure.methods.base import EraserModule, MethodConfig

TRAIN_METHODS = {
    "esd-x": layers.CROSS_ATTENTION,
    "esd-x-strict": layers.CROSS_ATTENTION_KV,
    "esd-u": layers.OUTSIDE_CROSS_ATTENTION,
    "esd-all": layers.EVERYTHING,
}


@dataclass
class ESDConfig(MethodConfig):
    name: str = "esd"
    train_method: str = "esd-x"
    eta: float = 1.0  # negative guidance, paper convention
    lr: float = 1e-5
    batch_size: int = 1
    ddim_steps: int = 50
    sample_guidance: float = 3.0
    sample_from: str = "trained"  # trained (paper) | frozen (later diffusers code)
    query_timestep: str = "ddim"  # ddim (later diffusers code) | window (CompVis code)
    erase_from: str | None = None
    prompt_template: str = "{concept}"


ESD_CHOICES = {"sample_from": ("trained", "frozen"), "query_timestep": ("ddim", "window")}


def esd_target(eps_from: torch.Tensor, eps_concept: torch.Tensor, eps_null: torch.Tensor, eta: float) -> torch.Tensor:
    """eps*(c_from) - (1 + eta)(eps*(c) - eps*(null)); with c_from = c: eps*(null) - eta (eps*(c) - eps*(null))."""
    return eps_from - (1.0 + eta) * (eps_concept - eps_null)


class ESD(EraserModule):
    name = "esd"
    Config = ESDConfig
    choices = {"loss": tuple(LOSSES), "train_method": tuple(TRAIN_METHODS), **ESD_CHOICES}

    def trained_layers(self) -> layers.Selector:
        return TRAIN_METHODS[self.config.train_method]

    def objective(self) -> torch.Tensor:
        return esd_loss(self, self.config)


def esd_loss(module: EraserModule, config: ESDConfig) -> torch.Tensor:
    """One ESD step's loss for ``module`` (an ESD or a LoRA eraser with the ESD objective)."""
    generator = module.step_generator()
    concept = module.concepts[int(torch.randint(len(module.concepts), (1,), generator=generator))]
    prompt = config.prompt_template.format(concept=concept)
    trained_prompt = config.erase_from or prompt
    concept_embeds = module.encode([prompt] * config.batch_size)
    trained_embeds = module.encode([trained_prompt] * config.batch_size)
    null_embeds = module.encode([""] * config.batch_size)

    stop = int(torch.randint(config.ddim_steps, (1,), generator=generator))
    latents, t = module.sample_until(trained_embeds, stop, config.ddim_steps, config.sample_guidance, generator,
                                     frozen=config.sample_from == "frozen")
    if config.query_timestep == "window":
        low, high = timestep_window(stop, config.ddim_steps, module.noise_schedule.config.num_train_timesteps)
        t = torch.randint(low, high, t.shape, generator=generator).to(t.device)
    eps_concept = module.predict_frozen(latents, t, concept_embeds)
    eps_null = module.predict_frozen(latents, t, null_embeds)
    eps_from = module.predict_frozen(latents, t, trained_embeds) if config.erase_from else eps_concept
    target = esd_target(eps_from, eps_concept, eps_null, config.eta)
    return module.loss(module.predict(latents, t, trained_embeds), target)


def timestep_window(stop: int, steps: int, num_train_timesteps: int) -> tuple[int, int]:
    """[low, high) of the DDPM timesteps in the window of the DDIM step x_t is at after ``stop`` of
    ``steps`` steps: the CompVis code's round(k T / S) and round((k + 1) T / S) with k = S - 1 - stop."""
    k = steps - 1 - stop
    return round(k * num_train_timesteps / steps), round((k + 1) * num_train_timesteps / steps)

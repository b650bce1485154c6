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

The stopping step and the query timestep t of the three predictions (``query_timestep``), with
S = ``ddim_steps``, T the number of training timesteps and k ~ U{0, ..., S - 1}:

- ``ddim`` (default; the later diffusers code, rohitgandikota/erasing esd_sd.py): k DDIM steps are
  taken and t is the DDIM timestep x_t is at.
- ``window`` (the CompVis code, rohitgandikota/erasing train-scripts/train-esd.py with its
  ldm/models/diffusion/ddim.py, commit b8aeab6): t is drawn uniformly, per sample, in the DDPM
  window of DDIM step k counted from the clean end, t ~ U{round(k / S * T), ..., round((k + 1) / S * T) - 1}
  (:func:`ddpm_window`), and x_t is what that code's sampler returns for ``till_T = k``: it stops
  after the step of index k - 1, so it takes min(S, S + 1 - k) steps (:func:`compvis_steps`), two
  DDIM steps past the window (x_t at DDIM step k - 2; fully denoised for k < 2). x_t after
  S - 1 - k steps would sit inside the window; the SD presets keep the CompVis code's pair.

With ``erase_from`` (a prompt c_from, e.g. erase "red" from "a circle"), x_t is sampled from
c_from, the trained prediction is eps_theta(x_t, c_from, t), and

    target = eps*(x_t, c_from, t) - (1 + eta) * (eps*(x_t, c, t) - eps*(x_t, t)),

which equals the target above when c_from = c (as in the reference code's erase_from).

The x_t bank (``xt_bank`` = N > 0; the toy world's presets and ``recipe=esd-fast`` use 16
trajectories from the frozen model, this class and the SD presets the paper's per-step sampling)
trades the per-step sampling for a bank: N complete
DDIM trajectories per concept, sampled in one batch (with the model ``sample_from`` names) and
kept at every step, from which each step draws ``batch_size`` (trajectory, step) pairs uniformly,
each with its own timestep. A step then costs the three frozen predictions (one batched forward)
and the trained one instead of ~``ddim_steps`` / 2 guided sampling steps. With
``sample_from=frozen`` the bank is the same distribution the per-step sampler draws from (the
later diffusers code); with ``trained`` it is refreshed every ``xt_bank_refresh`` steps (0:
never), so x_t lags the trained model by up to that many steps. The bank's noise is seeded by the
step it belongs to (the last refresh, or 0), so a resumed run samples the same bank from the
frozen model and ends with the weights of an uninterrupted one; from the trained model it samples
from the weights it resumes with. ``benchmarks/time_to_erase.py`` (README, "Time to erase") compares
the two loops on the toy world.

Several concepts are erased together by drawing one per step. The target's coefficients sum
to one, so the same formula holds in v-space for v-prediction models (SD 2.x) and in velocity
space for FLUX (rectified flow, v = eps - x_0): there x_t comes from FLUX's Euler sampler with
``ddim_steps`` steps, and eps*(x_t, t) is the empty prompt's prediction; for a guidance-distilled
model (FLUX.1-dev) every prediction is at the same guidance embedding (``erasure.families``). The
``window`` query timestep is DDPM's, so it is refused for FLUX. On SDXL eps*(x_t, t) is the
pipeline's unconditional prediction (zero conditioning; ``force_zeros_for_empty_prompt``).

The retain term (``retain_loss_w`` = lambda > 0; 0 by default: ESD as published has none) adds

    lambda * E_{c_r ~ R} L(eps_theta(x_t^r, c_r, t), eps*(x_t^r, c_r, t))

for ``retain_batch`` prompts c_r drawn uniformly from R (``retain``, the concepts to keep written with
``prompt_template``; the erased ones are dropped), x_t^r sampled from c_r as x_t is from c (the
same number of sampling steps; with the bank, from c_r's own trajectories): the utility term of
AdvUnlearn (Zhang et al., NeurIPS 2024, ``erasure.methods.advunlearn``). It pins the predictions
on the retained prompts where erasing one concept moves its neighbours too. ``retain_empty`` adds
the empty prompt to R, as UCE's paper code preserves "": sampling with classifier-free guidance w
reads w eps(c) - (w - 1) eps(""), so a drift of the unconditional prediction reaches every prompt
(w - 1) times over.

Parameter sets (``train_method``): ``esd-x`` all cross-attention (attn2) projections,
``esd-x-strict`` only attn2.to_k/to_v, ``esd-u`` every Linear/Conv2d outside attn2,
``esd-all`` every Linear/Conv2d. On FLUX (``erasure.layers``): ``esd-x`` every joint-attention
projection, ``esd-x-strict`` the text stream's add_k_proj/add_v_proj, ``esd-u`` everything
outside attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from erasure import layers
from erasure.families import Conditioning, Flux
from erasure.losses import LOSSES
from erasure.adapters import ADAPTER_CHOICES, AdapterOptions
from erasure.methods.base import EraserModule, MethodConfig

TRAIN_METHODS = {
    "esd-x": layers.CROSS_ATTENTION,
    "esd-x-strict": layers.CROSS_ATTENTION_KV,
    "esd-u": layers.OUTSIDE_CROSS_ATTENTION,
    "esd-all": layers.EVERYTHING,
}


@dataclass
class RetainOptions:
    """The retain term's options (ESD's and the LoRA eraser's, off by default; AdvUnlearn's utility term)."""

    retain: list[str] = field(default_factory=list)  # concepts to keep; the erased ones are dropped
    retain_batch: int = 5  # retain prompts per step
    retain_loss_w: float = 0.0  # lambda of the retain term (0: none)
    retain_empty: bool = False  # also keep the empty prompt's prediction (the unconditional branch of guidance)
    prompt_template: str = "{concept}"


@dataclass
class ESDConfig(AdapterOptions, RetainOptions, MethodConfig):
    name: str = "esd"
    train_method: str = "esd-x"
    eta: float = 1.0  # negative guidance, paper convention
    lr: float = 1e-5
    batch_size: int = 1
    ddim_steps: int = 50
    sample_guidance: float = 3.0
    sample_from: str = "trained"  # trained (paper) | frozen (later diffusers code; the fast loop)
    query_timestep: str = "ddim"  # ddim (later diffusers code) | window (CompVis code; the SD presets)
    erase_from: str | None = None
    xt_bank: int = 0  # 0: x_t sampled afresh every step (paper); N: a bank of N trajectories per concept (fast loop: 16)
    xt_bank_refresh: int = 0  # re-sample the bank every N steps (0: never; sample_from=frozen never needs it)


ESD_CHOICES = {"sample_from": ("trained", "frozen"), "query_timestep": ("ddim", "window")}


def esd_target(eps_from: torch.Tensor, eps_concept: torch.Tensor, eps_null: torch.Tensor, eta: float) -> torch.Tensor:
    """eps*(c_from) - (1 + eta)(eps*(c) - eps*(null)); with c_from = c: eps*(null) - eta (eps*(c) - eps*(null))."""
    return eps_from - (1.0 + eta) * (eps_concept - eps_null)


class ESD(EraserModule):
    name = "esd"
    Config = ESDConfig
    choices = {"loss": tuple(LOSSES), "train_method": tuple(TRAIN_METHODS), **ESD_CHOICES, **ADAPTER_CHOICES}
    needs = {"prompt_template": "concept_prompt", "retain": "neighbours"}
    # the parameters of the authors' released models: ESD-x for artist styles, ESD-u for objects and nudity
    by_concept_kind = {"style": {"method": {"train_method": "esd-x"}}, "object": {"method": {"train_method": "esd-u"}},
                       "nudity": {"method": {"train_method": "esd-u"}}}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_family(self, self.config)

    @classmethod
    def check(cls, config: ESDConfig, concepts: Sequence[str]) -> None:
        check_retain(config, concepts)

    def trained_layers(self) -> layers.Region:
        return TRAIN_METHODS[self.config.train_method]

    def objective(self) -> torch.Tensor:
        return esd_loss(self, self.config)


def check_family(module: EraserModule, config: ESDConfig) -> None:
    """Refuse options the model family cannot honour (one line, with the fix)."""
    if config.query_timestep == "window" and isinstance(module.family, Flux):
        raise ValueError("method.query_timestep=window draws DDPM timesteps; FLUX is a flow-matching model: "
                         "use method.query_timestep=ddim (the sampler's own timestep)")


def check_retain(config: RetainOptions, concepts: Sequence[str]) -> None:
    """Refuse a retain term without a concept to keep, or with a negative weight (one line, with the fix)."""
    if config.retain_loss_w < 0:
        raise ValueError(f"method.retain_loss_w must be 0 or more, got {config.retain_loss_w}")
    if config.retain_batch < 1:
        raise ValueError(f"method.retain_batch must be at least 1, got {config.retain_batch}")
    if config.retain_loss_w > 0 and not retain_prompts(config, concepts):
        raise ValueError("method.retain names no concept to keep; the retain term needs some "
                         "(method.retain=[a,b], method.retain_empty=true) or method.retain_loss_w=0")


def retain_prompts(config: RetainOptions, concepts: Sequence[str]) -> list[str]:
    """The retain set R: ``config.retain`` but the erased ``concepts``, written with the prompt template,
    and "" with ``retain_empty``."""
    kept = [config.prompt_template.format(concept=c) for c in config.retain if c not in concepts]
    return kept + [""] if config.retain_empty else kept


def draw_retain_prompts(config: RetainOptions, concepts: Sequence[str], generator: torch.Generator) -> list[str]:
    """``retain_batch`` prompts drawn uniformly, with replacement, from the retain set."""
    kept = retain_prompts(config, concepts)
    return [kept[int(i)] for i in torch.randint(len(kept), (config.retain_batch,), generator=generator)]


def retain_loss(module: EraserModule, prompts: Sequence[str], latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """L(eps_theta(x_t^r, c_r, t), eps*(x_t^r, c_r, t)) over the retain prompts c_r (zero at the original weights)."""
    target = module.predict_frozen(latents, t, module.encode_frozen(prompts))
    return module.loss(module.predict(latents, t, module.encode(prompts)), target)


def esd_loss(module: EraserModule, config: ESDConfig) -> torch.Tensor:
    """One ESD step's loss for ``module``, with the
    retain term when ``retain_loss_w`` > 0."""
    generator = module.step_generator()
    concept = module.concepts[int(torch.randint(len(module.concepts), (1,), generator=generator))]
    prompt = config.prompt_template.format(concept=concept)
    trained_prompt = config.erase_from or prompt
    concept_embeds = module.encode([prompt] * config.batch_size)
    trained_embeds = module.encode([trained_prompt] * config.batch_size)
    null_embeds = module.encode([""] * config.batch_size)
    if config.xt_bank:
        latents, t = banked_xt(module, config, trained_prompt, config.batch_size, generator)
        conditions = [concept_embeds, null_embeds, *([trained_embeds] if config.erase_from else [])]
        frozen = module.predict_frozen(latents.repeat(len(conditions), 1, 1, 1), t.repeat(len(conditions)),
                                       Conditioning.cat(conditions)).chunk(len(conditions))
        eps_concept, eps_null = frozen[0], frozen[1]
        eps_from = frozen[2] if config.erase_from else eps_concept
    else:
        k = int(torch.randint(config.ddim_steps, (1,), generator=generator))
        latents, t = sampled_xt(module, config, trained_embeds, k, generator)
        eps_concept = module.predict_frozen(latents, t, concept_embeds)
        eps_null = module.predict_frozen(latents, t, null_embeds)
        eps_from = module.predict_frozen(latents, t, trained_embeds) if config.erase_from else eps_concept
    target = esd_target(eps_from, eps_concept, eps_null, config.eta)
    erase = module.loss(module.predict(latents, t, trained_embeds), target)
    if not config.retain_loss_w:
        return erase

    prompts = draw_retain_prompts(config, module.concepts, generator)
    if config.xt_bank:
        drawn = [banked_xt(module, config, p, 1, generator) for p in prompts]
        retain_latents, retain_t = torch.cat([x for x, _ in drawn]), torch.cat([t for _, t in drawn])
    else:
        retain_latents, retain_t = sampled_xt(module, config, module.encode(prompts), k, generator)
    retain = retain_loss(module, prompts, retain_latents, retain_t)
    module.log("train/erase_loss", erase.detach())
    module.log("train/retain_loss", retain.detach())
    return erase + config.retain_loss_w * retain


def sampled_xt(module: EraserModule, config: ESDConfig, condition: Conditioning, k: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t) for the draw k ~ U{0..S-1}: guided sampling from noise with ``condition`` (the model
    ``sample_from`` names) stopped as ``query_timestep`` says (see the module docstring)."""
    frozen = config.sample_from == "frozen"
    if config.query_timestep == "ddim":
        return module.sample_until(condition, k, config.ddim_steps, config.sample_guidance, generator, frozen=frozen)
    latents = compvis_xt(module, condition, k, config.ddim_steps, config.sample_guidance, generator, frozen)
    low, high = ddpm_window(k, config.ddim_steps, module.family.num_train_timesteps)
    return latents, torch.randint(low, high, (len(latents),), generator=generator).to(module.device)


def compvis_xt(module: EraserModule, condition: Conditioning | torch.Tensor, k: int, steps: int, guidance: float,
               generator: torch.Generator, frozen: bool) -> torch.Tensor:
    """x_t as the CompVis code's sampler returns it for ``till_T = k``: :func:`compvis_steps` guided DDIM
    steps of ``steps`` from noise, by the original model if ``frozen``, else the trained one."""
    # recorded: its last latent exists also when every step is taken (k < 2), where no DDIM timestep follows
    trajectory, _ = module.sample_until(condition, compvis_steps(k, steps), steps, guidance, generator,
                                        frozen=frozen, record=True)
    return trajectory[:, -1]


class TrajectoryBank:
    """DDIM trajectories per prompt: latents (N, steps taken + 1, C, H, W) and the timesteps they are at
    (``ddim_steps`` - 1 steps; all ``ddim_steps`` for ``query_timestep=window``, whose x_t can be the last)."""

    def __init__(self, sampled_at: int):
        self.sampled_at = sampled_at
        self.trajectories: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, module: EraserModule, config: ESDConfig, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's trajectories, sampled in one batch the first time they are asked for."""
        if prompt not in self.trajectories:
            generator = torch.Generator().manual_seed(module.seed * 1_000_003 + 7 * self.sampled_at + module.global_rank)
            embeds = module.encode([prompt] * config.xt_bank)
            last = config.ddim_steps if config.query_timestep == "window" else config.ddim_steps - 1
            self.trajectories[prompt] = module.sample_until(embeds, last, config.ddim_steps, config.sample_guidance,
                                                            generator, frozen=config.sample_from == "frozen",
                                                            record=True)
        return self.trajectories[prompt]


def banked_xt(module: EraserModule, config: ESDConfig, prompt: str, count: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` (x_t, t) drawn from the prompt's trajectories in the module's bank (see the module
    docstring): uniform (trajectory, step) pairs, each with its own query timestep."""
    step = module.global_step
    bank = getattr(module, "trajectory_bank", None)
    refresh = config.xt_bank_refresh
    if bank is None or (refresh and step - bank.sampled_at >= refresh):
        bank = module.trajectory_bank = TrajectoryBank(step - step % refresh if refresh else 0)
    trajectories, timesteps = bank.get(module, config, prompt)
    which = torch.randint(config.xt_bank, (count,), generator=generator)
    drawn = torch.randint(config.ddim_steps, (count,), generator=generator)
    if config.query_timestep == "ddim":
        return trajectories[which, drawn], timesteps[drawn].to(module.device)
    steps = torch.tensor([compvis_steps(int(k), config.ddim_steps) for k in drawn])
    windows = [ddpm_window(int(k), config.ddim_steps, module.family.num_train_timesteps) for k in drawn]
    t = torch.tensor([int(torch.randint(low, high, (1,), generator=generator)) for low, high in windows])
    return trajectories[which, steps], t.to(module.device)


def compvis_steps(k: int, steps: int) -> int:
    """The DDIM steps the CompVis code's sampler takes for ``till_T = k`` of ``steps``: it breaks after
    the step of index k - 1 (indices run S - 1 down to 0), min(S, S + 1 - k)."""
    return min(steps, steps + 1 - k)


def ddpm_window(k: int, steps: int, num_train_timesteps: int) -> tuple[int, int]:
    """[low, high) of the DDPM timesteps of DDIM step k of ``steps``, counted from the clean end: the
    CompVis code's round(k / S * T) and round((k + 1) / S * T)."""
    return round(k / steps * num_train_timesteps), round((k + 1) / steps * num_train_timesteps)

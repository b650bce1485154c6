"""The base eraser: one LightningModule that every method subclasses.

It owns what all methods share:

* the model bundle (a diffusers pipeline of one :mod:`~erasure.families` family: SD-1.x/2.x,
  SDXL or FLUX), all frozen except the tensors the method selects: denoiser (UNet or FLUX
  transformer) tensors, or text-encoder tensors named ``text_encoder.<name>``;
* frozen reference predictions eps*(x_t, c, t) *without a second denoiser*: the original values of
  the trained tensors are kept, and ``torch.func.functional_call`` evaluates the denoiser (and the
  text encoder, for the frozen conditioning c) with them;
* prompt encoding through the pipeline's own ``encode_prompt``, cached per prompt, as a
  :class:`~erasure.families.Conditioning` (token context, and SDXL's and FLUX's pooled vectors);
* partial sampling with guidance (x_t for ESD-style objectives): DDIM with classifier-free
  guidance, or FLUX's Euler sampler;
* generation through the ordinary pipeline call (for the evaluation callback);
* saving the result as a delta of the changed tensors, or with ``method.adapter=lora`` (a method whose
  config has :class:`~erasure.adapters.AdapterOptions`) as a LoRA on the selected projections, saved as a
  diffusers LoRA folder (:mod:`erasure.adapters`).

A method sets ``name``, a ``Config`` dataclass of its options, the layers it trains
(``trained_layers``), its objective (``objective``) and, if not all, the model ``families`` it runs on.
What it reads from the run's protocol it declares, never the other way round: ``needs`` maps its
config keys onto the roles a protocol supplies (:data:`evaluation.protocols.base.ROLES`: an anchor,
a guide, a preserve or retain set, a prompt template), and ``by_concept_kind`` holds its papers'
settings per kind of concept (nudity, style, object), a config layer each.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch.func import functional_call
from torch.utils.data import DataLoader

from erasure import generation
from erasure.adapters import LORA_TARGETS, add_lora, load_lora, save_lora
from erasure.families import Conditioning, as_conditioning, family_of
from erasure.layers import Region, matching_modules
from erasure.losses import LOSSES
from erasure.weights import DELTA_FILE, TEXT_ENCODER_PREFIX, DeltaError, load_delta, save_delta


ENCODE_BATCH = 64  # prompts the frozen text encoders read at once


@dataclass
class MethodConfig:
    """Options every method has."""

    name: str = "???"
    loss: str = "mse"  # mse | hellinger | chi2 (erasure.losses)
    sigma: float = 1.0  # sigma of the f-divergence losses
    lr: float = 1e-5
    batch_size: int = 1


class EraserModule(L.LightningModule):
    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    choices: ClassVar[dict[str, Sequence[str]]] = {"loss": tuple(LOSSES)}
    edits_weights: ClassVar[bool] = True
    families: ClassVar[tuple[str, ...]] = ("sd", "sdxl", "flux")  # the model families it runs on (erasure.families)
    needs: ClassVar[dict[str, str]] = {}  # config key -> the protocol role that supplies its default
    by_concept_kind: ClassVar[dict[str, dict[str, Any]]] = {}  # concept kind -> {"method": ..., "trainer": ...}

    @classmethod
    def kind_defaults(cls, kind: str | None, concepts: Sequence[str]) -> dict[str, Any]:
        """The config layer of the method's published settings for erasing ``concepts`` of ``kind``."""
        return cls.by_concept_kind.get(kind, {}) if kind else {}

    @classmethod
    def reads(cls, key: str, config: Any) -> bool:
        """Whether a run of this method with ``config`` (its method section) uses the needed ``key``."""
        return key in cls.needs

    def __init__(self, pipeline, config: MethodConfig, concepts: Sequence[str], seed: int = 0,
                 resolution: int | None = None):
        super().__init__()
        self.pipeline = pipeline
        self.family = family_of(pipeline, resolution)
        if self.family.name not in self.families:
            raise ValueError(f"{self.name} runs on {', '.join(f.upper() for f in self.families)} models, not on "
                             f"{self.family.name.upper()} (README: which methods transfer); choose another method")
        self.denoiser, self.text_encoder, self.vae = self.family.denoiser, pipeline.text_encoder, pipeline.vae
        self.text_encoder_2 = getattr(pipeline, "text_encoder_2", None)  # SDXL, FLUX (registered: moves with the module)
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
        self.config, self.concepts, self.seed = config, list(concepts), seed
        self.latent_size = self.family.latent_size
        self.loss_fn = LOSSES[config.loss]
        self.trained = self.select_trainable()
        for parameter in self.trained.values():
            parameter.requires_grad_(True)
        self.original = {name: p.detach().clone() for name, p in self.trained.items()}
        self._prompt_cache: dict[str, Conditioning] = {}
        self.nonfinite_step: int | None = None  # the step whose loss was not finite, if any
        self.strict_loading = False  # checkpoints hold only the trained tensors

    # ----- what is trained ---------------------------------------------------------------
    def trained_layers(self) -> Region | None:
        """Which denoiser layers the method changes (``erasure.layers``); None: none."""
        raise NotImplementedError

    @property
    def adapter(self) -> str:
        """How the trained weights are parameterised (:mod:`erasure.adapters`): ``none`` or ``lora``."""
        return getattr(self.config, "adapter", "none")

    def select_trainable(self) -> dict[str, torch.nn.Parameter]:
        """The parameters of the denoiser's Linear/Conv2d modules that :meth:`trained_layers` selects, or
        with ``adapter=lora`` the factors of a LoRA on them (on ``lora_targets`` where named).

        A method that trains the text encoder returns its parameters as ``text_encoder.<name>``."""
        region = self.trained_layers()
        if region is None:
            return {}
        if self.adapter == "lora":
            region = LORA_TARGETS.get(self.config.lora_targets, region)
        try:
            modules = list(matching_modules(self.denoiser, region))
        except ValueError as error:
            raise ValueError(f"{self.name}: {error}; choose other layers for a {self.family.name} model") from None
        if not modules:
            raise ValueError(f"{self.name}: no {type(self.denoiser).__name__} parameter matches "
                             f"{region.selector_for(self.denoiser)[0]!r}; is this a diffusers SD/SDXL/FLUX model?")
        if self.adapter == "lora":
            return add_lora(self.denoiser, [name for name, _ in modules], self.config)
        return {f"{module_name}.{parameter_name}": parameter for module_name, module in modules
                for parameter_name, parameter in module.named_parameters(recurse=False)}

    @property
    def trains_text_encoder(self) -> bool:
        """Whether some trained tensors are the text encoder's."""
        return any(name.startswith(TEXT_ENCODER_PREFIX) for name in self.trained)

    def on_fit_start(self) -> None:
        self.original = {name: value.to(self.device) for name, value in self.original.items()}

    def train(self, mode: bool = True) -> EraserModule:
        """Lightning's train/eval switch, except that the second text encoder stays in eval mode: it is
        frozen, and FLUX's T5 would otherwise encode with dropout (0.1 in T5-XXL's config)."""
        super().train(mode)
        if self.text_encoder_2 is not None:
            self.text_encoder_2.eval()
        return self

    def configure_optimizers(self):
        return torch.optim.Adam(list(self.trained.values()), lr=self.config.lr)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, then the gradients freed: a checkpoint, an evaluation or the save after a step
        has their memory back (at real sizes, as much as the trained tensors)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def gradient_clip_val(self) -> float | None:
        """The gradient norm the Trainer clips to (None: no clipping; methods that optimise manually keep None)."""
        return None

    @classmethod
    def check(cls, config: MethodConfig, concepts: Sequence[str]) -> None:
        """Raise ValueError (one line) for option combinations a schema cannot express."""

    def train_dataloader(self) -> DataLoader:
        """Objectives draw their own inputs; the loader only counts steps."""
        return DataLoader(range(self.trainer.max_steps if self.trainer.max_steps > 0 else 1), batch_size=None)

    def step_generator(self) -> torch.Generator:
        """Randomness of one step, a function of (seed, step, rank) alone, so resumed runs repeat it;
        under DDP each rank draws its own samples (the gradients are averaged: a larger batch)."""
        world_size = self._trainer.world_size if self._trainer is not None else 1
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step * world_size + self.global_rank)

    # ----- the objective -------------------------------------------------------------------
    def objective(self) -> torch.Tensor:
        """The method's loss for the current step (inputs drawn from :meth:`step_generator`)."""
        raise NotImplementedError

    def training_step(self, step: int, batch_idx: int) -> torch.Tensor | None:
        """One step of the objective. A non-finite loss stops training before it can reach the
        weights (the step is skipped), so the run ends with the last good weights."""
        loss = self.objective()
        if not torch.isfinite(loss):
            self.nonfinite_step = self.global_step
            self.trainer.should_stop = True
            return None
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # ----- predictions ------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], cache: bool = True) -> Conditioning:
        """The current model's conditioning (the text encoders' hidden states (batch, tokens, width), and
        SDXL's or FLUX's pooled vectors) through the pipeline's ``encode_prompt``.

        Cached per prompt and without gradients by default; ``cache=False`` encodes afresh with
        gradients (attacks that train token embeddings). While the method trains text-encoder
        tensors, every call encodes afresh with gradients (a cached encoding would be stale after
        the next step)."""
        if not cache or self.trains_text_encoder:
            return self.family.encode(prompts, self.device)
        return self.encode_frozen(prompts)

    def encode_frozen(self, prompts: Sequence[str]) -> Conditioning:
        """The original model's hidden states, the conditioning of :meth:`predict_frozen`; cached per
        prompt, without gradients. The same as :meth:`encode` unless the method trains text-encoder
        tensors; then the original tensors give them, through ``functional_call``."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        for start in range(0, len(missing), ENCODE_BATCH):  # bounded memory: T5-XXL's attention grows with the batch
            batch = missing[start:start + ENCODE_BATCH]
            with torch.no_grad():
                encoded = (Conditioning(self.encode_with_original_text_encoder(batch)) if self.trains_text_encoder
                           else self.family.encode(batch, self.device))
            self._prompt_cache.update((prompt, encoded[i:i + 1]) for i, prompt in enumerate(batch))
        return Conditioning.cat([self._prompt_cache[p] for p in prompts]).to(self.device)

    def encode_with_original_text_encoder(self, prompts: Sequence[str]) -> torch.Tensor:
        """What ``encode_prompt`` (without clip skip) gives with the original text-encoder tensors
        (SD-1.x/2.x: the one text encoder's hidden states)."""
        tokenizer = self.pipeline.tokenizer
        tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        mask = tokens.attention_mask.to(self.device) if use_mask else None
        original = {name.removeprefix(TEXT_ENCODER_PREFIX): value for name, value in self.original.items()
                    if name.startswith(TEXT_ENCODER_PREFIX)}
        hidden = functional_call(self.text_encoder, original, (tokens.input_ids.to(self.device),),
                                 {"attention_mask": mask})[0]
        return hidden.to(self.text_encoder.dtype)

    def forget_prompts(self) -> None:
        """Empty the prompt cache (after the text encoder or its token table changed)."""
        self._prompt_cache.clear()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, H, W, 3) -> VAE latents (the mean of the posterior, scaled)."""
        pixels = images.permute(0, 3, 1, 2).float().div(127.5).sub(1).to(self.device, self.vae.dtype)
        return self.family.latents_from_vae(self.vae.encode(pixels).latent_dist.mean)

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor,
                condition: Conditioning | torch.Tensor) -> torch.Tensor:
        """The trained model's prediction eps_theta(x_t, c, t) (v for v-prediction models and FLUX)."""
        return self.family.output(self.denoiser(**self.family.inputs(latents, timesteps, as_conditioning(condition))),
                                  latents)

    @torch.no_grad()
    def predict_frozen(self, latents: torch.Tensor, timesteps: torch.Tensor,
                       condition: Conditioning | torch.Tensor) -> torch.Tensor:
        """The original model's prediction eps*(x_t, c, t), from the saved original tensors (``condition``:
        the original conditioning, :meth:`encode_frozen`)."""
        original = {name: value for name, value in self.original.items() if not name.startswith(TEXT_ENCODER_PREFIX)}
        inputs = self.family.inputs(latents, timesteps, as_conditioning(condition))
        return self.family.output(functional_call(self.denoiser, original, (), inputs), latents)

    @torch.no_grad()
    def sample_until(self, condition: Conditioning | torch.Tensor, stop: int, steps: int, guidance: float,
                     generator: torch.Generator, frozen: bool = False,
                     record: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``stop`` of ``steps`` sampling steps from pure noise with guidance ``guidance``: DDIM with
        classifier-free guidance (FLUX: Euler, the guidance as the family guides, :mod:`erasure.families`).

        Returns (x_t, t): the partially denoised latents and the timestep they are at. ``frozen``:
        sample with the original model (its denoiser and unconditional encoding). ``record``: return
        every latent of the trajectory instead, (batch, stop + 1, ...) with the timesteps (stop + 1,)
        they are at.
        """
        condition = as_conditioning(condition)
        scheduler = self.family.sampling_scheduler(steps)
        shape = (len(condition), self.family.latent_channels, self.latent_size, self.latent_size)
        latents = torch.randn(shape, generator=generator).to(self.device, condition.embeds.dtype)
        latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
        unconditional = (self.encode_frozen if frozen else self.encode)([""] * len(condition))
        predict = self.predict_frozen if frozen else self.predict
        trajectory = [latents]
        for t in scheduler.timesteps[:stop]:
            prediction = self.family.guided(predict, latents, t, condition, unconditional, guidance)
            latents = scheduler.step(prediction, t, latents).prev_sample
            if record:
                trajectory.append(latents)
        if record:
            return torch.stack(trajectory, dim=1), scheduler.timesteps[:stop + 1].to(self.device)
        timestep = scheduler.timesteps[stop].expand(len(condition)).to(self.device)
        return latents, timestep

    def add_noise(self, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """x_t at a random training timestep t; returns (x_t, eps, t). DDPM: x_t = sqrt(a_t) x_0 +
        sqrt(1 - a_t) eps, t ~ U{0..T-1}; FLUX: x_t = (1 - s) x_0 + s eps, t = 1000 s."""
        t = self.family.draw_timesteps(len(latents), generator)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        return self.family.add_noise(latents, noise, t), noise, t.to(self.device)

    def denoising_loss(self, latents: torch.Tensor, condition: Conditioning | torch.Tensor,
                       generator: torch.Generator) -> torch.Tensor:
        """The plain diffusion loss || eps_theta(x_t, c, t) - eps ||^2 (eps -> v for v-prediction, eps - x_0
        for FLUX) at a random t."""
        x_t, noise, t = self.add_noise(latents, generator)
        return torch.nn.functional.mse_loss(self.predict(x_t, t, condition), self.noise_target(latents, noise, t))

    def noise_target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model predicts for x_t = add_noise(latents, noise, t): eps, v for v-prediction models,
        the velocity eps - x_0 for FLUX."""
        return self.family.target(latents, noise, t)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(prediction, target, self.config.sigma)

    # ----- generation and results ---------------------------------------------------------
    @contextlib.contextmanager
    def original_weights(self) -> Iterator[None]:
        """Temporarily put the original values back into the trained tensors."""
        with torch.no_grad():
            current = {name: p.detach().clone() for name, p in self.trained.items()}
            for name, parameter in self.trained.items():
                parameter.copy_(self.original[name])
            try:
                yield
            finally:
                for name, parameter in self.trained.items():
                    parameter.copy_(current[name])

    def prompts_for_generation(self, prompts: Sequence[str]) -> tuple[list[str], list[str] | None]:
        """(prompts, negative prompts) the erased model is sampled with; weight edits keep the prompts."""
        return list(prompts), None

    def guidance_for_generation(self) -> generation.Guidance | None:
        """What replaces classifier-free guidance when the erased model samples (None: nothing does)."""
        return None

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], sampler: generation.Sampler,
                 original: bool = False, batch_size: int = 64,
                 negative_prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Images (N, H, W, 3) uint8 of the original model or of the erased model.

        ``negative_prompts`` (one per prompt) are for the original model; the erased model's come
        from :meth:`prompts_for_generation`."""
        if negative_prompts is not None and not original:
            raise ValueError("negative_prompts are for the original model (original=True); the erased model's "
                             "come from prompts_for_generation")
        prompts, negatives = (list(prompts), negative_prompts) if original else self.prompts_for_generation(prompts)
        weights = self.original_weights() if original else contextlib.nullcontext()
        was_training = self.training
        self.eval()
        try:
            with weights:
                return generation.generate(self.pipeline, prompts, seeds, sampler, negative_prompts=negatives,
                                           batch_size=batch_size, progress=True,
                                           resolution=self.latent_size * self.pipeline.vae_scale_factor,
                                           guidance=None if original else self.guidance_for_generation())
        finally:
            self.train(was_training)

    def changed_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.trained.items() if not torch.equal(p.detach(), self.original[n].to(p.device))}

    def save_erased(self, folder: Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``folder/unet_delta.safetensors`` with the changed tensors only (``erasure.weights``), or
        with ``adapter=lora`` the diffusers LoRA folder (``pytorch_lora_weights.safetensors``)."""
        folder = Path(folder)
        if self.adapter == "lora":
            return save_lora(self.pipeline, self.denoiser, self.family.denoiser_name, folder)
        folder.mkdir(parents=True, exist_ok=True)
        info = {"method": self.name, "concepts": ",".join(self.concepts), **{k: str(v) for k, v in (metadata or {}).items()}}
        save_delta(self.changed_tensors(), folder / DELTA_FILE, metadata=info)
        return folder / DELTA_FILE

    @torch.no_grad()
    def load_erased(self, folder: Path) -> None:
        """The inverse of :meth:`save_erased`: put a saved result into the trained tensors."""
        if self.adapter == "lora":
            load_lora(self.denoiser, self.family.denoiser_name, folder)
            return
        delta = load_delta(Path(folder) / DELTA_FILE)
        unknown = sorted(set(delta) - set(self.trained))
        if unknown:
            raise DeltaError(f"the delta holds {unknown[0]!r}, which {self.name} with these options does not train; "
                             "restore it with the run's own config.yaml")
        wrong = next((name for name, value in delta.items() if value.shape != self.trained[name].shape), None)
        if wrong is not None:
            raise DeltaError(f"the delta's {wrong!r} has shape {tuple(delta[wrong].shape)} where this model's has "
                             f"{tuple(self.trained[wrong].shape)}; was it trained for another model?")
        for name, value in delta.items():
            self.trained[name].copy_(value.to(self.trained[name]))

    # Checkpoints carry the trained tensors only (a full SD UNet would be gigabytes per checkpoint).
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {name if name.startswith(TEXT_ENCODER_PREFIX) else f"denoiser.{name}" for name in self.trained}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


class InferenceTimeEraser(EraserModule):
    """A method that changes no weight and acts at generation time only (prompt rewriting, guidance).

    Its "training" is one step that stops the Trainer; its result is its rule, ``<name>.json``."""

    edits_weights = False

    def trained_layers(self) -> None:
        return None  # nothing

    def configure_optimizers(self):
        return None

    def training_step(self, step: int, batch_idx: int) -> None:
        self.trainer.should_stop = True  # nothing to train

    def rule(self) -> dict[str, Any]:
        """What the method does at generation time, as written to ``<name>.json``."""
        return {"concepts": self.concepts, **asdict(self.config)}

    def save_erased(self, folder: Path, metadata: dict[str, Any] | None = None) -> Path:
        """No weights change: the result is the rule, ``<name>.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.json"
        path.write_text(json.dumps(self.rule(), indent=2) + "\n")
        return path

    def load_erased(self, folder: Path) -> None:
        """Nothing to load: the rule is the run's config."""

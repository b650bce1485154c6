"""Pretrain the toy world's base model and classifier from scratch.

    python -m erasure.toyworld.pretrain                 # full run (about 1.5-2 h on a 2-core CPU)
    python -m erasure.toyworld.pretrain family=flux     # the FLUX-format model beside it (--family flux)
    python -m erasure.toyworld.pretrain family=flux --flow-steps 9600   # ... continued, then
    python -m erasure.toyworld.pretrain family=flux --flow-steps 15000  # ... to the shipped 15,000
    python -m erasure.toyworld.pretrain --quick --output /tmp/toy   # smoke run, < 2 min
    python -m erasure.toyworld.pretrain --init checkpoints/toyworld-v1 --unet-steps 5000 --lr 5e-4 \
        --output checkpoints/toyworld        # continue a shipped model on today's caption grammar
    python -m erasure.toyworld.pretrain --init checkpoints/toyworld-v2 --text-encoder checkpoints/toyworld/clip \
        --unet-steps 4000 --lr 1e-3 --work runs/pretrain-v3 --output runs/toyworld-v3   # v3 (shipped): under the toy CLIP

Stages, each resumable (rerun the same command after an interruption):

1. ``vae``        AutoencoderKL on fresh renders (L1 + MSE reconstruction, KL weight 1e-6).
2. ``dataset``    a fixed set of renders, their latents and their VAE reconstructions.
3. ``classifier`` shape/colour/style CNN on renders *and* reconstructions, with blur and
                  noise, so that it reads generated images and not only clean renders.
4. ``unet``       UNet2DConditionModel and CLIPTextModel trained jointly on the latents with
                  captions from the caption grammar (epsilon prediction, min-SNR-5 weighting,
                  AdamW, cosine schedule, EMA); with ``--text-encoder`` the UNet alone, under the
                  frozen text tower of a CLIP folder (:mod:`erasure.toyworld.clip`), as Stable
                  Diffusion's UNet is trained under CLIP's.
5. ``export``     the StableDiffusionPipeline folder ``<output>/sd`` and ``<output>/classifier``.

``family=flux`` trains the FLUX-format model instead (``architecture.make_flux_transformer``) and
writes ``<output>/flux`` and ``<output>/pretrain_flux.json``: the VAE, the classifier and the initial
CLIP text encoder are the SD model's in ``--init`` (default: the shipped ``checkpoints/toyworld``),
the stage ``flow`` trains the transformer, a new T5 encoder and the CLIP encoder jointly with the
rectified-flow objective (:class:`FlowMatchingTraining`). A larger ``--flow-steps`` continues a
finished stage from ``<work>/flow/last.ckpt`` (the shipped model: 6,000 steps continued to 9,600, then to 15,000),
and the record then keeps the earlier run's (``continues``) and the total time (``seconds_total``).

With ``--init <folder>`` (a folder holding ``sd`` and ``classifier`` as ``--output`` writes it, or ``sd`` alone
with the shipped classifier, as ``checkpoints/toyworld-v2``)
the VAE and the classifier are that model's, unchanged, and the UNet stage starts from its UNet
and text encoder: continued pretraining, for instance on a new caption grammar.

Training runs through ``lightning.Trainer`` (GPU when present), checkpointing every few
hundred steps into ``<work>/<stage>/last.ckpt``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxPipeline, StableDiffusionPipeline
from diffusers.training_utils import compute_snr
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, TQDMProgressBar
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchvision.transforms.functional import gaussian_blur
from transformers import CLIPTextModel

from erasure.toyworld.real_architectures import t5_tokenizer
from erasure.bundle import TOYWORLD_CLASSIFIER, ModelLoadError, resolve_path
from erasure.generation import to_unit_range
from erasure.io import atomic_directory, atomic_write_text
from erasure.toyworld import architecture as arch
from erasure.toyworld.captions import caption
from erasure.toyworld.classifier import load_classifier, save_classifier
from erasure.toyworld.tokenizer import shipped_or_new_tokenizer
from erasure.toyworld.world import ATTRIBUTES, Scene, render_array, sample_scene


@dataclass(frozen=True)
class Budget:
    vae_steps: int = 1500
    dataset_size: int = 40_000
    classifier_steps: int = 1500
    unet_steps: int = 8000
    flow_steps: int = 6000  # family=flux: the transformer's steps
    vae_batch: int = 32
    classifier_batch: int = 128
    unet_batch: int = 64
    checkpoint_every: int = 250


QUICK = Budget(vae_steps=8, dataset_size=256, classifier_steps=8, unet_steps=8, flow_steps=8,
               vae_batch=8, classifier_batch=16, unet_batch=8, checkpoint_every=4)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


class RenderStream(IterableDataset):
    """An endless stream of fresh renders, seeded."""

    def __init__(self, seed: int):
        self.seed = seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        while True:
            yield to_unit_range(torch.from_numpy(render_array([sample_scene(rng)])))[0]


class VAETraining(L.LightningModule):
    def __init__(self, lr: float = 1e-3, kl_weight: float = 1e-6):
        super().__init__()
        self.vae = arch.make_vae()
        self.lr, self.kl_weight = lr, kl_weight

    def training_step(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor:
        posterior = self.vae.encode(images).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + self.kl_weight * posterior.kl().mean()
        self.log("vae/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.vae.parameters(), lr=self.lr)


class ClassifierData(Dataset):
    """Renders and their VAE reconstructions (one of the two per item), blurred or noised at random."""

    def __init__(self, renders: torch.Tensor, recons: torch.Tensor, labels: torch.Tensor):
        self.renders, self.recons, self.labels = renders, recons, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        source = self.recons if torch.rand(()) < 0.5 else self.renders
        image = to_unit_range(source[i : i + 1])[0]
        if torch.rand(()) < 0.3:
            sigma = float(torch.empty(()).uniform_(0.3, 0.8))
            image = gaussian_blur(image, kernel_size=5, sigma=sigma)
        if torch.rand(()) < 0.3:
            image = image + 0.06 * torch.randn_like(image)
        return image, self.labels[i]


class ClassifierTraining(L.LightningModule):
    def __init__(self, lr: float = 2e-3, total_steps: int = 1500):
        super().__init__()
        self.classifier = arch.ToyClassifier()
        self.lr, self.total_steps = lr, total_steps

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self.classifier(images)
        loss = sum(F.cross_entropy(logits[name], labels[:, k], label_smoothing=0.05) for k, name in enumerate(ATTRIBUTES))
        self.log("classifier/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.classifier.parameters(), lr=self.lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=self.total_steps)
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]


class CaptionedLatents(Dataset):
    """Latent samples of the fixed dataset, each with a fresh random caption."""

    def __init__(self, latent_mean: torch.Tensor, latent_std: torch.Tensor, scenes: list[Scene], seed: int):
        self.mean, self.std, self.scenes = latent_mean, latent_std, scenes
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int):
        latent = self.mean[i] + self.std[i] * torch.randn_like(self.std[i])
        return latent, caption(self.scenes[i], self.rng)


class TextToImageTraining(L.LightningModule):
    """The UNet trained with the epsilon objective, weighted by min-SNR-gamma (Hang et al. 2023):
    w(t) = min(SNR(t), gamma) / SNR(t); jointly with its text encoder (toyworld v1, v2), or under a frozen
    CLIP text tower as Stable Diffusion's (``frozen_text_encoder``: a CLIP folder, toyworld v3)."""

    def __init__(self, tokenizer, scaling_factor: float, total_steps: int, lr: float = 1e-3, snr_gamma: float = 5.0,
                 init: Path | None = None, frozen_text_encoder: Path | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        if frozen_text_encoder is not None:
            self.text_encoder = CLIPTextModel.from_pretrained(frozen_text_encoder).requires_grad_(False)
        elif init is not None:  # continued pretraining: the saved text encoder, whatever its depth (v3's has 4 layers)
            self.text_encoder = CLIPTextModel.from_pretrained(init / "sd" / "text_encoder")
        else:
            self.text_encoder = arch.make_text_encoder(
                len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
            )
        self.unet = arch.make_unet()
        if init is not None:  # continued pretraining: start from a saved pipeline's weights
            self.unet.load_state_dict(load_file(init / "sd" / "unet" / "diffusion_pytorch_model.safetensors"))
        self.scheduler = arch.make_train_scheduler()
        self.scaling_factor, self.total_steps, self.lr, self.snr_gamma = scaling_factor, total_steps, lr, snr_gamma

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        latents, captions = batch
        latents = latents * self.scaling_factor
        ids = self.tokenizer(list(captions), padding="max_length", max_length=arch.MAX_TOKENS, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        prediction = self.unet(noisy, t, self.text_encoder(ids)[0]).sample
        snr = compute_snr(self.scheduler, t)
        weight = snr.clamp(max=self.snr_gamma) / snr
        loss = (weight * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        self.log("unet/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in [*self.unet.parameters(), *self.text_encoder.parameters()] if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)
        return [optimizer], [{"scheduler": warmup_cosine(optimizer, self.total_steps), "interval": "step"}]


def capitalize_sentences(text: str) -> str:
    """ "please draw a star. a red one" -> "Please draw a star. A red one" (T5 reads case; CLIP does not)."""
    return ". ".join(sentence[:1].upper() + sentence[1:] for sentence in text.split(". "))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: int = 200):
    """Linear warm-up over ``warmup`` steps, then cosine decay to a tenth of the peak."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class FlowMatchingTraining(L.LightningModule):
    """Joint training of a FLUX transformer, its T5 encoder and its CLIP encoder with the rectified-flow
    objective of SD3 and FLUX (Esser et al. 2024, "Scaling Rectified Flow Transformers"):

        x_s = (1 - s) x_0 + s eps,   loss = || v_theta(x_s, c, s) - (eps - x_0) ||^2,

    with s drawn logit-normally (s = sigmoid(n), n ~ N(0, 1)). The latents are the VAE's, shifted and
    scaled as FluxPipeline reads them ((z - shift_factor) * scaling_factor) and packed 2x2 into tokens.
    Half the captions are capitalised sentence by sentence, so the case-sensitive T5 reads both forms."""

    def __init__(self, tokenizer, tokenizer_2, clip_init: Path, total_steps: int, lr: float = 5e-4):
        super().__init__()
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder = CLIPTextModel.from_pretrained(clip_init)
        self.text_encoder_2 = arch.make_t5_encoder(len(tokenizer_2), tokenizer_2.pad_token_id, tokenizer_2.eos_token_id)
        self.transformer = arch.make_flux_transformer()
        self.total_steps, self.lr = total_steps, lr

    def token_ids(self, tokenizer, captions: list[str]) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=arch.MAX_TOKENS, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        latents, captions = batch
        captions = [capitalize_sentences(c) if torch.rand(()) < 0.5 else c for c in captions]
        pooled = self.text_encoder(self.token_ids(self.tokenizer, captions)).pooler_output
        context = self.text_encoder_2(self.token_ids(self.tokenizer_2, captions))[0]
        noise = torch.randn_like(latents)
        s = torch.sigmoid(torch.randn(len(latents), device=self.device))
        noisy = (1 - s.view(-1, 1, 1, 1)) * latents + s.view(-1, 1, 1, 1) * noise
        batch_size, channels, height, width = latents.shape
        pack = lambda x: FluxPipeline._pack_latents(x, batch_size, channels, height, width)  # noqa: E731
        prediction = self.transformer(
            hidden_states=pack(noisy), timestep=s, pooled_projections=pooled, encoder_hidden_states=context,
            txt_ids=torch.zeros(context.shape[1], 3, device=self.device),
            img_ids=FluxPipeline._prepare_latent_image_ids(batch_size, height // 2, width // 2, self.device, latents.dtype),
        ).sample
        loss = F.mse_loss(prediction, pack(noise - latents))
        self.log("flow/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        return [optimizer], [{"scheduler": warmup_cosine(optimizer, self.total_steps), "interval": "step"}]


def fit(module: L.LightningModule, loader: DataLoader, steps: int, stage_dir: Path, every: int, callbacks=(),
        gradient_clip_val: float | None = None) -> None:
    """Train ``module`` for ``steps`` optimizer steps, resuming from ``stage_dir/last.ckpt``."""
    checkpoint = ModelCheckpoint(dirpath=stage_dir, save_last=True, save_top_k=0, every_n_train_steps=every)
    trainer = L.Trainer(
        max_steps=steps, accelerator="auto", devices=1, logger=False, gradient_clip_val=gradient_clip_val,
        callbacks=[checkpoint, TQDMProgressBar(refresh_rate=25), *callbacks],
        log_every_n_steps=10, enable_model_summary=False, num_sanity_val_steps=0, max_epochs=-1,
    )
    last = stage_dir / "last.ckpt"
    trainer.fit(module, loader, ckpt_path=str(last) if last.exists() else None, weights_only=True)


def stage_vae(budget: Budget, work: Path, seed: int, init: Path | None):
    done = work / "vae.safetensors"
    if init is not None:
        return AutoencoderKL.from_pretrained(init / "sd" / "vae").eval().requires_grad_(False)
    if not done.exists():
        L.seed_everything(seed)
        module = VAETraining()
        fit(module, DataLoader(RenderStream(seed), batch_size=budget.vae_batch), budget.vae_steps,
            work / "vae", budget.checkpoint_every)
        save_file(module.vae.state_dict(), done)
    vae = arch.make_vae()
    vae.load_state_dict(load_file(done))
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def stage_dataset(budget: Budget, work: Path, seed: int, vae) -> dict[str, torch.Tensor]:
    """Renders, labels, latent posteriors and reconstructions of a fixed scene set."""
    done = work / "dataset.safetensors"
    if not done.exists():
        print(f"[dataset] rendering and encoding {budget.dataset_size} scenes")
        rng = np.random.default_rng(seed + 1)
        scenes = [sample_scene(rng) for _ in range(budget.dataset_size)]
        renders = torch.from_numpy(render_array(scenes))
        means, stds, recons = [], [], []
        for chunk in renders.split(1024):
            posterior = vae.encode(to_unit_range(chunk)).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
            recons.append(to_uint8(vae.decode(posterior.mean).sample))
        tensors = {
            "renders": renders, "reconstructions": torch.cat(recons),
            "latent_mean": torch.cat(means).contiguous(), "latent_std": torch.cat(stds).contiguous(),
            "labels": torch.tensor([list(s.label().values()) for s in scenes]),
        }
        save_file(tensors, done)
    return load_file(done)


def scene_of(label: torch.Tensor) -> Scene:
    """A scene carrying a label row's attributes (all a caption needs)."""
    shape, color, style = (ATTRIBUTES[name][int(v)] for name, v in zip(ATTRIBUTES, label))
    return Scene(shape, color, style, center=(0, 0), radius=0, rotation=0, rgb=(0, 0, 0), background=(0, 0, 0),
                 pattern_angle=0, pattern_phase=(0, 0))


def scenes_of(data: dict[str, torch.Tensor]) -> list[Scene]:
    """The scenes of the dataset's label rows."""
    return [scene_of(row) for row in data["labels"]]


def stage_classifier(budget: Budget, work: Path, seed: int, data: dict[str, torch.Tensor],
                     init: Path | None) -> arch.ToyClassifier:
    done = work / "classifier.safetensors"
    if init is not None:  # its own classifier, else the shipped one (toyworld-v2 shares it with v3)
        return load_classifier(init / "classifier" if (init / "classifier").is_dir() else TOYWORLD_CLASSIFIER)
    if not done.exists():
        L.seed_everything(seed + 2)
        n_train = int(0.9 * len(data["labels"]))
        train = ClassifierData(data["renders"][:n_train], data["reconstructions"][:n_train], data["labels"][:n_train])
        module = ClassifierTraining(total_steps=budget.classifier_steps)
        fit(module, DataLoader(train, batch_size=budget.classifier_batch, shuffle=True, drop_last=True),
            budget.classifier_steps, work / "classifier", budget.checkpoint_every)
        save_file(module.classifier.state_dict(), done)
    classifier = arch.ToyClassifier()
    classifier.load_state_dict(load_file(done))
    return classifier.eval().requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(classifier: arch.ToyClassifier, images_uint8: torch.Tensor, labels: torch.Tensor) -> dict:
    logits = [classifier(to_unit_range(chunk)) for chunk in images_uint8.split(1024)]
    return {
        name: float((torch.cat([l[name] for l in logits]).argmax(1) == labels[:, k]).float().mean())
        for k, name in enumerate(ATTRIBUTES)
    }


def fit_on_captions(module: L.LightningModule, data: dict[str, torch.Tensor], seed: int, steps: int, stage_dir: Path,
                    budget: Budget, **fit_options) -> None:
    """Train a text-to-image stage on the dataset's latents with fresh captions, seeded, with EMA
    weights (decay 0.999, from step min(1000, steps / 2)); resumes from ``stage_dir/last.ckpt``."""
    L.seed_everything(seed)
    dataset = CaptionedLatents(data["latent_mean"], data["latent_std"], scenes_of(data), seed)
    ema = EMAWeightAveraging(decay=0.999, update_starting_at_step=min(1000, steps // 2))
    fit(module, DataLoader(dataset, batch_size=budget.unet_batch, shuffle=True, drop_last=True),
        steps, stage_dir, budget.checkpoint_every, callbacks=[ema], **fit_options)


def stage_unet(budget: Budget, work: Path, seed: int, data: dict[str, torch.Tensor], tokenizer, scaling_factor: float,
               lr: float, init: Path | None, frozen_text_encoder: Path | None = None):
    done = work / "unet.safetensors"
    module = TextToImageTraining(tokenizer, scaling_factor, budget.unet_steps, lr=lr, init=init,
                                 frozen_text_encoder=frozen_text_encoder)
    if not done.exists():
        fit_on_captions(module, data, seed + 3, budget.unet_steps, work / "unet", budget)
        state = {f"unet.{k}": v for k, v in module.unet.state_dict().items()}
        state |= {f"text_encoder.{k}": v.contiguous() for k, v in module.text_encoder.state_dict().items()}
        save_file(state, done)
    state = load_file(done)
    module.unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
    if frozen_text_encoder is not None:  # the CLIP's own tensors (EMA averages frozen ones too, to rounding)
        return module.unet.eval(), CLIPTextModel.from_pretrained(frozen_text_encoder).eval()
    module.text_encoder.load_state_dict({k[13:]: v for k, v in state.items() if k.startswith("text_encoder.")})
    return module.unet.eval(), module.text_encoder.eval()


def stage_flow(budget: Budget, work: Path, seed: int, data: dict[str, torch.Tensor], tokenizer, tokenizer_2,
               clip_init: Path, lr: float) -> FlowMatchingTraining:
    """The FLUX-format model's transformer and text encoders (``data``'s latents already shifted and scaled)."""
    done = work / "flow.safetensors"
    module = FlowMatchingTraining(tokenizer, tokenizer_2, clip_init, budget.flow_steps, lr=lr)
    if not done.exists() or trained_steps(done) < budget.flow_steps:  # a larger budget continues from last.ckpt
        fit_on_captions(module, data, seed + 4, budget.flow_steps, work / "flow", budget, gradient_clip_val=1.0)
        save_file({k: v.clone() for k, v in module.state_dict().items()}, done,  # clone: T5 ties two names
                  metadata={"steps": str(budget.flow_steps)})
    module.load_state_dict(load_file(done))
    return module.eval()


def trained_steps(path: Path) -> int:
    """The step budget a finished stage file was trained to (0 when it does not say)."""
    with safe_open(path, "pt") as handle:
        return int((handle.metadata() or {}).get("steps", 0))


def pretrain_flux(output: Path, work: Path, budget: Budget, init: Path, seed: int = 0, lr: float = 5e-4) -> None:
    """The FLUX-format toy model: ``<output>/flux`` (see the module docstring)."""
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    vae = stage_vae(budget, work, seed, init)
    data = stage_dataset(budget, work, seed, vae)
    shift = float(data["latent_mean"].mean())
    scaling_factor = float(1.0 / (data["latent_mean"] - shift).std())
    vae.register_to_config(scaling_factor=scaling_factor, shift_factor=shift)
    shifted = {**data, "latent_mean": (data["latent_mean"] - shift) * scaling_factor,
               "latent_std": data["latent_std"] * scaling_factor}
    tokenizer = shipped_or_new_tokenizer()
    tokenizer_2 = t5_tokenizer(arch.MAX_TOKENS)
    record_path = output / "pretrain_flux.json"
    earlier = json.loads(record_path.read_text()) if record_path.exists() else None
    continues = earlier if earlier and earlier["budget"]["flow_steps"] < budget.flow_steps else None
    module = stage_flow(budget, work, seed, shifted, tokenizer, tokenizer_2, init / "sd" / "text_encoder", lr)
    pipeline = FluxPipeline(
        scheduler=arch.make_flow_scheduler(), vae=vae, text_encoder=module.text_encoder, tokenizer=tokenizer,
        text_encoder_2=module.text_encoder_2, tokenizer_2=tokenizer_2, transformer=module.transformer,
    )
    with atomic_directory(output / "flux") as folder:
        pipeline.save_pretrained(folder, safe_serialization=True)
    seconds = round(time.time() - start, 1)
    record = {"family": "flux", "budget": asdict(budget), "seed": seed, "lr": lr, "init": str(init),
              "seconds": seconds, "device": str(module.device),
              "parameters": {name: sum(p.numel() for p in getattr(module, name).parameters())
                             for name in ("transformer", "text_encoder", "text_encoder_2")}}
    if continues:  # a larger --flow-steps continued the earlier run: keep its record and the total time
        record |= {"seconds_total": round(continues.get("seconds_total", continues["seconds"]) + seconds, 1),
                   "continues": continues}
    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    print(f"[export] wrote {output / 'flux'} in {seconds} s")


def pretrain(output: Path, work: Path, budget: Budget, seed: int = 0, lr: float = 1e-3, init: Path | None = None,
             frozen_text_encoder: Path | None = None) -> None:
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    vae = stage_vae(budget, work, seed, init)
    data = stage_dataset(budget, work, seed, vae)
    scaling_factor = vae.config.scaling_factor if init is not None else float(1.0 / data["latent_mean"].std())
    vae.register_to_config(scaling_factor=scaling_factor)
    classifier = stage_classifier(budget, work, seed, data, init)
    n_train = int(0.9 * len(data["labels"]))
    held_out = data["labels"][n_train:]
    classifier_quality = {
        "renders": classifier_accuracy(classifier, data["renders"][n_train:], held_out),
        "vae_reconstructions": classifier_accuracy(classifier, data["reconstructions"][n_train:], held_out),
    }
    print(f"[classifier] held-out accuracy: {json.dumps(classifier_quality)}")
    tokenizer = shipped_or_new_tokenizer()
    unet, text_encoder = stage_unet(budget, work, seed, data, tokenizer, scaling_factor, lr, init, frozen_text_encoder)

    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=arch.make_sample_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    with atomic_directory(output / "sd") as folder:
        pipeline.save_pretrained(folder, safe_serialization=True)
    with atomic_directory(output / "classifier") as folder:
        save_classifier(classifier, folder, {"held_out_accuracy": classifier_quality})
    record = {"budget": asdict(budget), "seed": seed, "lr": lr, "init": str(init) if init else None,
              "frozen_text_encoder": str(frozen_text_encoder) if frozen_text_encoder else None,
              "seconds": round(time.time() - start, 1),
              "device": str(unet.device), "classifier_held_out_accuracy": classifier_quality}
    atomic_write_text(output / "pretrain.json", json.dumps(record, indent=2) + "\n")
    print(f"[export] wrote {output / 'sd'} and {output / 'classifier'} in {record['seconds']} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m erasure.toyworld.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("sd", "flux"), default="sd",
                        help="sd: the Stable-Diffusion-format model; flux: the FLUX-format one (also as family=flux)")
    parser.add_argument("--output", type=Path, default=Path("checkpoints/toyworld"), help="where the model folders go")
    parser.add_argument("--work", type=Path, default=None, help="stage checkpoints (default: runs/pretrain[-quick])")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny budget: proves the script works, not quality")
    parser.add_argument("--unet-steps", type=int, default=None, help="override the UNet step budget")
    parser.add_argument("--flow-steps", type=int, default=None, help="override the FLUX transformer's step budget")
    parser.add_argument("--lr", type=float, default=None, help="UNet/flow-stage peak learning rate (1e-3 sd, 5e-4 flux)")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from this model folder (holding sd/ and classifier/): keeps its VAE and classifier")
    parser.add_argument("--text-encoder", type=Path, default=None,
                        help="train the UNet under this CLIP folder's text tower, frozen (python -m erasure.toyworld.clip)")
    args = parser.parse_args(options_from_overrides(sys.argv[1:] if argv is None else argv))
    try:
        init = resolve_path(args.init) if args.init is not None else None
    except ModelLoadError as error:
        parser.error(f"--init {error}")
    if init is not None and not (init / "sd" / "unet").is_dir():
        parser.error(f"--init {args.init}: no sd/unet folder there; give a folder written by --output")
    budget = QUICK if args.quick else Budget()
    overrides = {k: v for k, v in (("unet_steps", args.unet_steps), ("flow_steps", args.flow_steps)) if v is not None}
    budget = Budget(**(asdict(budget) | overrides))
    suffix = ("-flux" if args.family == "flux" else "") + ("-quick" if args.quick else "")
    work = args.work or Path(f"runs/pretrain{suffix}")
    if args.family == "flux":
        lr = args.lr if args.lr is not None else 5e-4
        pretrain_flux(args.output, work, budget, init or resolve_path("checkpoints/toyworld"), args.seed, lr)
    else:
        pretrain(args.output, work, budget, args.seed, args.lr if args.lr is not None else 1e-3, init, args.text_encoder)


def options_from_overrides(argv: list[str]) -> list[str]:
    """``family=flux`` -> ``--family flux``: the key=value form of the other commands, for any option."""
    options = []
    for token in argv:
        key, equals, value = token.partition("=")
        options += [f"--{key.replace('_', '-')}", value] if equals and not token.startswith("-") else [token]
    return options


if __name__ == "__main__":
    main()

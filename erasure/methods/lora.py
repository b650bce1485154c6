"""LoRA erasers: a PEFT LoRA adapter on chosen denoiser modules, trained with an erasure objective,
saved as a diffusers LoRA folder that ordinary pipelines of the model's family load.

    pipe = StableDiffusionPipeline.from_pretrained(base)        # or StableDiffusionXLPipeline, FluxPipeline
    pipe.load_lora_weights(run_dir / "erased", adapter_name="circle")

On FLUX the targets are the joint attention's projections (``xattn`` and ``attn``: every attention
projection of both streams, the EraseAnything setting; ``xattn-kv``: the text stream's
add_k_proj/add_v_proj), and the file holds ``transformer.*`` keys as FluxPipeline saves them.

The adapter adds B A x (scaled by alpha / rank) to each targeted projection W x, with B
initialised to zero, so the untrained adapter *is* the original model: the frozen reference
predictions of the base class (the original values of the trained tensors, i.e. B = 0) need no
second UNet. The objective is ESD's (``objective=esd``, default; see ``erasure.methods.esd``, with its
optional retain term)
or Concept Ablation's (``objective=ablation``; see ``erasure.methods.ablation``), with either
method's options. With ``objective=ablation`` the adapter is optimised as Concept Ablation's
reference codes optimise (``optimizer``, ``weight_decay``, ``max_grad_norm``, ``scale_lr``); with
``objective=esd`` by Adam at ``lr``, as the ESD code. Several erasers combine in one pipeline
with ``set_adapters``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

from erasure import layers
from erasure.losses import LOSSES
from erasure.methods.ablation import (
    ABLATION_CHOICES, ANCHORS_FILE, Ablation, AblationConfig, Anchors, ablation_loss, ablation_optimizer, check_anchor,
)
from erasure.methods.base import EraserModule
from erasure.methods.esd import ESD, ESD_CHOICES, ESDConfig, check_retain, esd_loss
from erasure.weights import DeltaError

ADAPTER = "eraser"
LORA_FILE = "pytorch_lora_weights.safetensors"
TARGETS = {"xattn": layers.CROSS_ATTENTION, "xattn-kv": layers.CROSS_ATTENTION_KV, "attn": layers.ATTENTION}


@dataclass
class LoRAConfig(AblationConfig, ESDConfig):
    name: str = "lora"
    objective: str = "esd"  # esd | ablation
    target_modules: str = "xattn"  # xattn | xattn-kv | attn
    rank: int = 4
    alpha: float = 4.0
    lr: float = 1e-3
    batch_size: int = 4


class LoRA(EraserModule):
    name = "lora"
    Config = LoRAConfig
    choices = {"loss": tuple(LOSSES), "objective": ("esd", "ablation"), "target_modules": tuple(TARGETS),
               **ESD_CHOICES, **ABLATION_CHOICES}
    needs = {**ESD.needs, **Ablation.needs}

    @classmethod
    def reads(cls, key: str, config) -> bool:
        return key in (ESD if config.get("objective", "esd") == "esd" else Ablation).needs

    @classmethod
    def check(cls, config: LoRAConfig, concepts) -> None:
        check_retain(config, concepts)
        if config.objective == "ablation":
            check_anchor(config, concepts)
            if config.retain_loss_w:
                raise ValueError("method.retain_loss_w weighs the ESD objective's retain term; Concept Ablation keeps "
                                 "through its anchor: use method.objective=esd or method.retain_loss_w=0")

    def select_trainable(self) -> dict[str, torch.nn.Parameter]:
        denoiser = self.family.denoiser
        targets = [name for name, _ in layers.matching_modules(denoiser, TARGETS[self.config.target_modules])]
        adapter = LoraConfig(r=self.config.rank, lora_alpha=self.config.alpha, target_modules=targets,
                             init_lora_weights=True)
        denoiser.add_adapter(adapter, adapter_name=ADAPTER)
        return {name: p for name, p in denoiser.named_parameters() if "lora_" in name}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.config.objective == "ablation":
            return ablation_optimizer(self, self.config)
        return super().configure_optimizers()

    def gradient_clip_val(self) -> float | None:
        return self.config.max_grad_norm if self.config.objective == "ablation" else None

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.config.objective == "ablation":
            self.anchors = Anchors.load_or_generate(self, self.config, Path(self.trainer.default_root_dir) / ANCHORS_FILE)

    def objective(self) -> torch.Tensor:
        if self.config.objective == "esd":
            return esd_loss(self, self.config)
        return ablation_loss(self, self.config, self.anchors)

    def save_erased(self, folder: Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write a diffusers LoRA folder (``pytorch_lora_weights.safetensors``) through the pipeline class's
        own ``save_lora_weights`` (``unet_lora_layers``; FLUX: ``transformer_lora_layers``)."""
        folder = Path(folder)
        layers = get_peft_model_state_dict(self.denoiser, adapter_name=ADAPTER)
        type(self.pipeline).save_lora_weights(folder, **{f"{self.family.denoiser_name}_lora_layers": layers},
                                              safe_serialization=True)
        return folder / LORA_FILE

    @torch.no_grad()
    def load_erased(self, folder: Path) -> None:
        path = Path(folder) / LORA_FILE
        if not path.exists():
            raise DeltaError(f"{folder} has no {LORA_FILE}; pass the erased/ folder of a LoRA run")
        try:
            state = load_file(path)
        except (SafetensorError, OSError) as error:
            raise DeltaError(f"cannot read the LoRA {path}: {error}; re-run the erasure") from None
        prefix = f"{self.family.denoiser_name}."
        denoiser_state = {name.removeprefix(prefix): value for name, value in state.items() if name.startswith(prefix)}
        if not denoiser_state:
            raise DeltaError(f"the LoRA in {folder} holds no {prefix}* tensors; was it trained for another model family?")
        try:
            result = set_peft_model_state_dict(self.denoiser, denoiser_state, adapter_name=ADAPTER)
        except RuntimeError as error:  # shapes of another architecture or rank
            raise DeltaError(f"the LoRA in {folder} does not fit this UNet ({str(error).splitlines()[-1].strip()}); "
                             "was it trained for another model or with another rank?") from None
        if result.unexpected_keys:
            raise DeltaError(f"the LoRA in {folder} does not fit this UNet ({result.unexpected_keys[0]}); "
                             "was it trained with other target_modules or for another model?")

"""How a method's trained weights are parameterised: the selected tensors themselves (``adapter=none``) or
a LoRA on the selected projections (``adapter=lora``), for any objective that trains the denoiser (ESD,
Concept Ablation, AdvUnlearn on the UNet).

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) replaces each targeted
projection W x by

    W x + (alpha / r) B A x,    A (r x d_in) random,  B (d_out x r) zero at the start,

so the untrained adapter *is* the original model: the base module's frozen reference predictions (the
trained tensors at their original values, i.e. B = 0) need no second denoiser. The adapter is PEFT's,
saved as a diffusers LoRA folder that the model family's ordinary pipeline loads:

    pipe = StableDiffusionPipeline.from_pretrained(base)        # or StableDiffusionXLPipeline, FluxPipeline
    pipe.load_lora_weights(run_dir / "erased", adapter_name="circle")

Several erasers combine in one pipeline with ``set_adapters``. The targets (``lora_targets``) are the
method's own trained layers (``trained``: ESD's ``train_method``, Concept Ablation's ``parameters``) or a
named set: ``xattn`` every cross-attention projection, ``xattn-kv`` their keys and values, ``attn`` every
attention projection. On FLUX the cross-attention is the joint attention (``xattn`` and ``attn``: every
projection of both streams, the EraseAnything setting; ``xattn-kv``: the text stream's add_k_proj and
add_v_proj), and the file holds ``transformer.*`` keys as FluxPipeline saves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

from erasure import layers
from erasure.weights import DeltaError

ADAPTERS = ("none", "lora")
ADAPTER_NAME = "eraser"
LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_TARGETS = {"xattn": layers.CROSS_ATTENTION, "xattn-kv": layers.CROSS_ATTENTION_KV, "attn": layers.ATTENTION}
ADAPTER_CHOICES = {"adapter": ADAPTERS, "lora_targets": ("trained", *LORA_TARGETS)}


@dataclass
class AdapterOptions:
    """The parameterisation options of a method that trains denoiser weights."""

    adapter: str = "none"  # none: the selected tensors | lora: a LoRA on the selected projections
    rank: int = 4  # LoRA's r
    alpha: float = 4.0  # LoRA's alpha (the update is scaled by alpha / r)
    lora_targets: str = "trained"  # trained: the method's trained layers | xattn | xattn-kv | attn


def add_lora(denoiser: torch.nn.Module, targets: list[str], options: AdapterOptions) -> dict[str, torch.nn.Parameter]:
    """Wrap the modules named ``targets`` in a PEFT LoRA adapter (B = 0); returns its factors by name."""
    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, target_modules=targets, init_lora_weights=True)
    denoiser.add_adapter(config, adapter_name=ADAPTER_NAME)
    return {name: parameter for name, parameter in denoiser.named_parameters() if "lora_" in name}


def save_lora(pipeline, denoiser: torch.nn.Module, denoiser_name: str, folder: Path) -> Path:
    """A diffusers LoRA folder (``pytorch_lora_weights.safetensors``) through the pipeline class's own
    ``save_lora_weights`` (``unet_lora_layers``; FLUX: ``transformer_lora_layers``)."""
    state = get_peft_model_state_dict(denoiser, adapter_name=ADAPTER_NAME)
    type(pipeline).save_lora_weights(folder, **{f"{denoiser_name}_lora_layers": state}, safe_serialization=True)
    return Path(folder) / LORA_FILE


@torch.no_grad()
def load_lora(denoiser: torch.nn.Module, denoiser_name: str, folder: Path) -> None:
    """The inverse of :func:`save_lora` into a denoiser that carries the same adapter; a file of another
    model, rank or set of targets is a one-line DeltaError."""
    path = Path(folder) / LORA_FILE
    if not path.exists():
        raise DeltaError(f"{folder} has no {LORA_FILE}; pass the erased/ folder of a run with method.adapter=lora")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as error:
        raise DeltaError(f"cannot read the LoRA {path}: {error}; re-run the erasure") from None
    prefix = f"{denoiser_name}."
    denoiser_state = {name.removeprefix(prefix): value for name, value in state.items() if name.startswith(prefix)}
    if not denoiser_state:
        raise DeltaError(f"the LoRA in {folder} holds no {prefix}* tensors; was it trained for another model family?")
    try:
        result = set_peft_model_state_dict(denoiser, denoiser_state, adapter_name=ADAPTER_NAME)
    except RuntimeError as error:  # shapes of another architecture or rank
        raise DeltaError(f"the LoRA in {folder} does not fit this {type(denoiser).__name__} "
                         f"({str(error).splitlines()[-1].strip()}); was it trained for another model or with another rank?") from None
    if result.unexpected_keys:
        raise DeltaError(f"the LoRA in {folder} does not fit this {type(denoiser).__name__} ({result.unexpected_keys[0]}); "
                         "was it trained with other lora_targets or for another model?")

"""Peak GPU memory of one eraser training step at real size, estimated without a GPU.

    python -m benchmarks.memory          # both steps below; writes benchmarks/memory.json

Two steps, each at 1024x1024 pixels, batch size 1, bf16 weights, gradient checkpointing on
(diffusers' ``enable_gradient_checkpointing``), text encoders and VAE not resident (the prompt
embeddings are cached, as ``EraserModule.encode`` caches them):

* ``sdxl_esd_x``: the SDXL base 1.0 UNet (``erasure/architectures/sdxl.json``) trained by ESD-x:
  every cross-attention projection (``attn2.to_q/to_k/to_v/to_out.0``, ``erasure.layers``);
* ``flux_lora``: the FLUX.1-dev transformer (``flux.json``) with the LoRA eraser's adapter (rank 4,
  the default) on every joint-attention projection; 512 T5 tokens and 4096 image tokens.

One step is what ``erasure.methods.esd.esd_loss`` runs with the x_t bank: the three frozen predictions (concept,
empty prompt and, with ``erase_from``, the trained prompt: the worst case; without it there are
two) as one no-grad forward of batch 3 through ``torch.func.functional_call`` with the saved
original tensors, then one trained forward and its backward, then the optimizer step. Before the
first step the x_t bank is sampled once (``xt_bank=16``, the toy presets' default and recipe esd-fast, 50 DDIM steps): a
no-grad forward of batch 32 on SDXL (classifier-free guidance), 16 on FLUX.1-dev (guidance-distilled);
the bank stays resident.

Method: exact accounting without computing, an estimate since no GPU ran it. The models are built
on the meta device and given fake tensors (``FakeTensorMode``: shapes and dtypes, no data); the
step runs on them under :class:`LiveMemory`, a dispatch mode that counts the bytes of every tensor
storage from the op that creates it until it is freed. The peak of that count is what a GPU
allocator has to hold; not counted: the CUDA context (about 0.5 GB), kernel workspaces (cuBLAS,
attention) and the caching allocator's rounding and fragmentation, so keep a GB or two of margin.

The count is split into parts at each phase's peak: weights (every denoiser parameter, bf16),
frozen copies, master copies and optimizer states (below), grads (of the trained tensors: bf16
in the backward, fp32 in the optimizer step), the x_t bank, inputs (latents, cached prompt
embeddings, the frozen target), activations (what the trained forward made and still lives:
at its end, what is saved for backward; within the forward its temporaries too) and transient
(the rest: sampling and frozen forwards, recomputed checkpointed blocks, activation gradients,
the optimizer's temporaries).

Assumptions:

* attention is SDPA with a memory-efficient kernel (flash attention, as diffusers uses on a GPU):
  no tokens x tokens matrix is kept; the same kernel is forced here (its CPU form, on fake tensors);
* Adam with fp32 state (``foreach``, PyTorch's default on a GPU): for each trained bf16 tensor an
  fp32 master copy and two fp32 moments (12 bytes per trained parameter); the forward and backward
  run on the bf16 weights, whose bf16 gradients are upcast to fp32 for the step. Pure bf16 Adam
  (``trainer.precision=bf16-true``: bf16 moments, no master copies, no upcast) needs 8 bytes per
  trained parameter less, but loses ESD's small updates (lr 1e-5) to bf16 rounding;
* the frozen copies are the project's ``EraserModule.original``, one clone of each trained tensor
  (for the LoRA eraser, of the LoRA factors: its frozen prediction is the adapter at B = 0);
* PEFT gives the LoRA factors their base layers' dtype (bf16).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, UNet2DConditionModel
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from erasure import layers
from erasure.adapters import LORA_TARGETS, AdapterOptions, add_lora
from erasure.architectures import architecture_config
from erasure.io import atomic_write_text
from erasure.losses import mse
from erasure.methods.esd import TRAIN_METHODS, esd_target

GB = 1e9
RESOLUTION = 1024
FROZEN_BATCH = 3
BANK = 16
DDIM_STEPS = 50
LORA_RANK = 4
TARGET_GB = {"sdxl_esd_x": 24, "flux_lora": 40}
PARTS = ("weights", "frozen copies", "master copies", "optimizer states", "grads", "x_t bank", "inputs",
         "activations", "transient")
PHASES = ("bank sampling", "frozen forwards", "trained forward", "backward", "optimizer step")


class LiveMemory(TorchDispatchMode):
    """Live tensor bytes, by part, and their peaks.

    Every storage an op creates while the mode is active is counted under the current ``part``
    until it is freed (a weak reference on the storage); a view or an in-place result adds nothing.
    Tensors made before (parameters) are counted with :meth:`track`. ``peak`` is the largest total;
    ``phases`` the parts at the largest total within each ``phase`` (see :meth:`counting`)."""

    def __init__(self):
        super().__init__()
        self.part, self.phase = "transient", None
        self.live = dict.fromkeys(PARTS, 0)
        self.peak = 0
        self.phases: dict[str, dict[str, int]] = {}
        self._phase_peaks: dict[str, int] = {}
        self._storages: dict[int, tuple[weakref.ref, list]] = {}

    def _record(self, storage: torch.UntypedStorage) -> list | None:
        entry = self._storages.get(id(storage))
        return entry[1] if entry is not None and entry[0]() is storage else None

    def track(self, tensor: torch.Tensor, part: str | None = None) -> None:
        """Count ``tensor``'s storage under ``part`` (default: the current one) unless it is counted already."""
        storage = tensor.untyped_storage()
        if self._record(storage) is not None:
            return
        record = [part or self.part, storage.nbytes()]
        key = id(storage)

        def freed(_, record=record, key=key):
            self.live[record[0]] -= record[1]
            self._storages.pop(key, None)

        self._storages[key] = (weakref.ref(storage, freed), record)
        self.live[record[0]] += record[1]
        total = sum(self.live.values())
        self.peak = max(self.peak, total)
        if self.phase is not None and total > self._phase_peaks.get(self.phase, -1):
            self._phase_peaks[self.phase], self.phases[self.phase] = total, dict(self.live)

    def relabel(self, tensor: torch.Tensor, part: str) -> None:
        """Move ``tensor``'s storage to ``part``."""
        record = self._record(tensor.untyped_storage())
        self.live[record[0]] -= record[1]
        self.live[part] += record[1]
        record[0] = part

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out

    @contextlib.contextmanager
    def counting(self, phase: str | None = None, part: str = "transient") -> Iterator[None]:
        """Within the block: new tensors count under ``part``, the peak also under ``phase``."""
        saved = self.phase, self.part
        self.phase, self.part = phase, part
        try:
            yield
        finally:
            self.phase, self.part = saved


def fake_model(build: Callable[[], torch.nn.Module], dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """``build()`` run on the meta device with ``dtype`` weights, then every parameter and buffer replaced
    by a tensor of the same shape and dtype made in the active FakeTensorMode (fake CPU tensors: shapes,
    no data; a fake module cannot be converted with ``.to``, hence meta first)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = build()
    finally:
        torch.set_default_dtype(saved)
    fakes: dict[int, torch.Tensor] = {}  # one fake tensor per tensor, so tied weights stay tied
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for key, tensor in tensors.items():
                if tensor is not None:
                    if id(tensor) not in fakes:
                        fake = torch.empty(tensor.shape, dtype=tensor.dtype)
                        is_parameter = isinstance(tensor, torch.nn.Parameter)
                        fakes[id(tensor)] = torch.nn.Parameter(fake, tensor.requires_grad) if is_parameter else fake
                    tensors[key] = fakes[id(tensor)]
    return model


def with_lora(denoiser: torch.nn.Module, targets: list[str], rank: int) -> torch.nn.Module:
    """``denoiser`` with the LoRA eraser's adapter on the modules ``targets`` (:func:`erasure.adapters.add_lora`,
    alpha = rank as recipe lora)."""
    add_lora(denoiser, targets, AdapterOptions(adapter="lora", rank=rank, alpha=rank))
    return denoiser


def eraser_step(denoiser: torch.nn.Module, trained: dict[str, torch.nn.Parameter],
                inputs: Callable[[int], dict], bank_latent: tuple[int, ...], sampling_batch: int,
                batch: int = 1, bank: int = BANK, checkpointing: bool = True) -> dict:
    """The live bytes of an eraser's steps on ``denoiser`` (built by :func:`fake_model` in the active
    FakeTensorMode) training ``trained``; ``inputs(n)`` gives the denoiser's keyword arguments for a batch of n.

    Counted in this order: the resident tensors (weights, one frozen copy of each trained tensor,
    fp32 master copies of the trained tensors, the x_t bank of ``bank`` trajectories of
    ``DDIM_STEPS`` latents of shape ``bank_latent``, cached inputs); the phase "bank sampling", one
    no-grad sampling forward of batch ``sampling_batch``; Adam's state (made by a first optimizer
    step, so that the step counted is any step after the first); then the step of batch ``batch``:
    "frozen forwards" (the three frozen predictions, one no-grad forward of batch 3 x ``batch``
    through ``functional_call`` with the frozen copies), "trained forward", "backward" (the
    trained bf16 gradients) and "optimizer step" (the gradients upcast to fp32, Adam's foreach
    update of the master copies, copied back into the bf16 weights).

    Returns the peak bytes, the parts at each phase's peak, and the bytes saved for backward (the
    part "activations": what the trained forward made and still lives at its end)."""
    memory = LiveMemory()
    for parameter in denoiser.parameters():
        memory.track(parameter, "weights")
    denoiser.requires_grad_(False)
    for parameter in trained.values():
        parameter.requires_grad_(True)
        parameter.register_post_accumulate_grad_hook(lambda p: memory.relabel(p.grad, "grads"))
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    with memory, sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with memory.counting(part="frozen copies"):
            original = {name: p.detach().clone() for name, p in trained.items()}
        with memory.counting(part="master copies"):  # .float() of an fp32 tensor: itself, no copy
            masters = {name: p.detach().float() for name, p in trained.items()}
        optimizer = torch.optim.Adam(list(masters.values()), lr=1e-5, foreach=True)
        with memory.counting(part="x_t bank"):
            trajectories = torch.randn(bank, DDIM_STEPS, *bank_latent, dtype=torch.bfloat16)
        with memory.counting(part="inputs"):
            step_inputs, frozen_inputs = inputs(batch), inputs(FROZEN_BATCH * batch)
            sampling_inputs = inputs(sampling_batch)
        with memory.counting("bank sampling"), torch.no_grad():
            denoiser(**sampling_inputs)
        del sampling_inputs
        with memory.counting(part="optimizer states"):
            for master in masters.values():
                master.grad = torch.zeros_like(master)
            optimizer.step()
            optimizer.zero_grad()

        with memory.counting("frozen forwards"), torch.no_grad():
            frozen = functional_call(denoiser, original, (), frozen_inputs).sample.chunk(FROZEN_BATCH)
            target = esd_target(frozen[2], frozen[0], frozen[1], eta=1.0)
        del frozen
        memory.relabel(target, "inputs")
        with memory.counting("trained forward", part="activations"):
            loss = mse(denoiser(**step_inputs).sample, target)
        saved = memory.live["activations"]
        with memory.counting("backward"):
            loss.backward()
        del loss
        with memory.counting("optimizer step", part="grads"):
            for name, parameter in trained.items():
                masters[name].grad = parameter.grad.float()
                parameter.grad = None
            with memory.counting("optimizer step"):
                optimizer.step()
                with torch.no_grad():
                    for name, parameter in trained.items():
                        parameter.copy_(masters[name])
            optimizer.zero_grad()
        del trajectories
    return {"peak": memory.peak, "phases": memory.phases, "saved_for_backward": saved}


def unet_inputs(config: dict, resolution: int) -> Callable[[int], dict]:
    """SDXL UNet inputs for a batch, as ``StableDiffusionXL.inputs`` gives them from cached prompts:
    latents, timesteps, the 77-token context, the pooled text embedding and the 6 size/crop ids."""
    side = resolution // 8

    def inputs(batch: int) -> dict:
        return {"sample": torch.randn(batch, config["in_channels"], side, side, dtype=torch.bfloat16),
                "timestep": torch.full((batch,), 500),
                "encoder_hidden_states": torch.randn(batch, 77, config["cross_attention_dim"], dtype=torch.bfloat16),
                "added_cond_kwargs": {
                    "text_embeds": torch.randn(batch, config["projection_class_embeddings_input_dim"]
                                               - 6 * config["addition_time_embed_dim"], dtype=torch.bfloat16),
                    "time_ids": torch.randn(batch, 6, dtype=torch.bfloat16)}}
    return inputs


def flux_inputs(config: dict, resolution: int, tokens: int = 512) -> Callable[[int], dict]:
    """FLUX transformer inputs for a batch, as ``Flux.inputs`` packs them: 2x2 patches of the latents
    (resolution / 16 squared image tokens), ``tokens`` T5 tokens, the pooled CLIP embedding, the
    embedded guidance and the position ids."""
    side = resolution // 8
    channels = config["in_channels"] // 4

    def inputs(batch: int) -> dict:
        latents = torch.randn(batch, channels, side, side, dtype=torch.bfloat16)
        return {"hidden_states": FluxPipeline._pack_latents(latents, batch, channels, side, side),
                "timestep": torch.full((batch,), 0.5, dtype=torch.bfloat16),
                "guidance": torch.full((batch,), 3.5, dtype=torch.bfloat16),
                "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], dtype=torch.bfloat16),
                "encoder_hidden_states": torch.randn(batch, tokens, config["joint_attention_dim"],
                                                     dtype=torch.bfloat16),
                "txt_ids": torch.zeros(tokens, 3, dtype=torch.bfloat16),
                "img_ids": FluxPipeline._prepare_latent_image_ids(batch, side // 2, side // 2, "cpu", torch.bfloat16)}
    return inputs


def sdxl_esd_x(config: dict, resolution: int = RESOLUTION, **options) -> dict:
    """:func:`eraser_step` of ESD-x on the SDXL UNet of ``config`` (the "unet" part of an architecture JSON);
    bank sampling with classifier-free guidance (batch 2 x bank)."""
    with FakeTensorMode():
        unet = fake_model(lambda: UNet2DConditionModel(**config))
        trained = {f"{name}.{key}": p for name, module in layers.matching_modules(unet, TRAIN_METHODS["esd-x"])
                   for key, p in module.named_parameters(recurse=False)}
        side = resolution // 8
        result = eraser_step(unet, trained, unet_inputs(config, resolution), (config["in_channels"], side, side),
                             sampling_batch=2 * options.get("bank", BANK), **options)
    return {**result, "parameters": sum(p.numel() for p in unet.parameters()),
            "trained_parameters": sum(p.numel() for p in trained.values())}


def flux_lora(config: dict, resolution: int = RESOLUTION, rank: int = LORA_RANK, **options) -> dict:
    """:func:`eraser_step` of the LoRA eraser (rank ``rank``, ``lora_targets=xattn``: every joint-attention
    projection) on the FLUX transformer of ``config`` (the "transformer" part of an architecture JSON);
    bank sampling at the embedded guidance (FLUX.1-dev is guidance-distilled: batch = bank)."""
    with FakeTensorMode():
        base = fake_model(lambda: FluxTransformer2DModel(**config))
        targets = [name for name, _ in layers.matching_modules(base, LORA_TARGETS["xattn"])]
        transformer = fake_model(lambda: with_lora(FluxTransformer2DModel(**config), targets, rank))
        trained = {name: p for name, p in transformer.named_parameters() if "lora_" in name}
        channels, side = config["in_channels"] // 4, resolution // 8
        result = eraser_step(transformer, trained, flux_inputs(config, resolution), (channels, side, side),
                             sampling_batch=options.get("bank", BANK), **options)
    return {**result, "parameters": sum(p.numel() for p in base.parameters()),
            "trained_parameters": sum(p.numel() for p in trained.values())}


def in_gb(count: int) -> float:
    return round(count / GB, 2)


def report(name: str, result: dict, seconds: float) -> dict:
    """One step's JSON entry, in GB (1e9 bytes): the peak against its target, the peak of the training
    step alone (every phase but the bank sampling, which runs once per run), and each phase's total and parts."""
    step_peak = max(sum(result["phases"][phase].values()) for phase in PHASES if phase != "bank sampling")
    peak_phase = max(PHASES, key=lambda phase: sum(result["phases"][phase].values()))
    return {"step": name, "estimate": True, "target_gb": TARGET_GB[name], "peak_gb": in_gb(result["peak"]),
            "within_target": result["peak"] / GB <= TARGET_GB[name], "peak_phase": peak_phase,
            "training_step_peak_gb": in_gb(step_peak),
            "activations_saved_for_backward_gb": in_gb(result["saved_for_backward"]),
            "phases": {phase: {"total_gb": in_gb(sum(result["phases"][phase].values())),
                               "parts_gb": {part: in_gb(value) for part, value in result["phases"][phase].items()}}
                       for phase in PHASES},
            "parameters": result["parameters"], "trained_parameters": result["trained_parameters"],
            "seconds_to_count": round(seconds, 1)}


def table(entry: dict) -> str:
    """The entry's parts (rows) at each phase's peak (columns), in GB."""
    width = max(len(phase) for phase in PHASES)
    lines = [f"{'GB':<18}" + "".join(f"{phase:>{width + 2}}" for phase in PHASES)]
    for part in [*PARTS, "total"]:
        values = [entry["phases"][phase]["total_gb"] if part == "total" else entry["phases"][phase]["parts_gb"][part]
                  for phase in PHASES]
        lines.append(f"{part:<18}" + "".join(f"{value:>{width + 2}.2f}" for value in values))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("memory.json"))
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args(argv)
    entries = []
    for name, measure, config in [("sdxl_esd_x", sdxl_esd_x, architecture_config("sdxl")["unet"]),
                                  ("flux_lora", flux_lora, architecture_config("flux")["transformer"])]:
        start = time.perf_counter()
        entry = report(name, measure(config, batch=args.batch_size), time.perf_counter() - start)
        entries.append(entry)
        print(f"== {name} (estimate): peak {entry['peak_gb']} GB in {entry['peak_phase']}, target {entry['target_gb']} "
              f"GB: {'within' if entry['within_target'] else 'OVER'}; the training step alone "
              f"{entry['training_step_peak_gb']} GB; saved for backward {entry['activations_saved_for_backward_gb']} "
              f"GB; counted in {entry['seconds_to_count']} s")
        print(table(entry))
    method = " ".join(__doc__.split("Method: ", 1)[1].split("\n\n", 1)[0].split())
    assumptions = [" ".join(item.split()) for item in __doc__.split("Assumptions:", 1)[1].split("\n* ")[1:]]
    document = {"estimate": True, "method": method, "assumptions": assumptions, "resolution": RESOLUTION,
                "batch_size": args.batch_size, "steps": entries}
    atomic_write_text(args.output, json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

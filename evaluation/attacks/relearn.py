"""The relearn attack: is the erased concept dormant, or gone? Fine-tune and watch it come back.

Few-shot fine-tuning of the erased model on the original model's images of the concept, the
"instance-personalization probe" of "Erased or Dormant? Rethinking Concept Erasure Through
Reversibility" (Liu & Zhang, 2025); benign fine-tuning brings concepts back too ("Unstable
Unlearning", Suriyakumar et al., 2024). Tensors: the erased model's trained tensors, those the
method changed (``EraserModule.trained``: ESD's parameter set, the closed-form edits' projections,
a LoRA eraser's adapter); a method that changes no tensor (the instruction baseline, inference-time
guidance) gets the cross-attention keys and values (``attn2.to_k``/``to_v``; FLUX: the text
stream's ``attn.add_k_proj``/``add_v_proj``), the tensors that map the text into the denoiser.
Objective, K Adam steps (``attack.relearn.lr``, batch ``attack.batch_size``) of

    min_theta  E_{(p, x_0) ~ D, eps, t}  || eps_theta(x_t, t, tau(p)) - eps ||^2

from theta = the erased values, with D the attacker's data: ``attack.images`` original-model images
of the attacked target prompts p (as the erased model receives them: after the instruction
baseline's rewriting). The attack success rate (the evaluation's target prompts and seeds, the
method's own generation path) is measured after each K in ``attack.relearn.steps``; K = 0 is the
erased model itself, so its rate is the run's unattacked target accuracy.

Control: how fast does the same fine-tuning teach *any* concept? The same prompts, tensors,
optimiser, lr, steps, seed and number of images, from the same erased model, but the images show
a concept c' that was never erased: the original model's images of each attacker's prompt with the
concept's word replaced by c''s (same seeds), so the two data sets differ in the concept alone; the
control's rate is the share of the target prompts' images in which the evaluator sees c'. c' is,
by default (``attack.relearn.control=auto``), the run's retained concept (a concept the evaluator
checks and the method had to keep) that the erased model shows least on the target prompts before
fine-tuning, so both curves start from a floor. An erased concept that returns much faster than the
control is learned was dormant: the weights still hold it, and a few steps re-route the prompt to
it. At the control's pace, the fine-tuning teaches whatever it is shown, and the concept's return
says nothing about erasure. ``attack.relearn.control=<concept>`` names c', ``none`` skips it;
prompts that do not name the concept's word (I2P-style) or runs without retained concepts have no
control.

Nothing on disk changes: the tuned tensors' erased values are kept in memory and put back after
each branch. Same seed, same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from erasure.families import Flux
from erasure.layers import CROSS_ATTENTION_KV, matching_modules
from erasure.methods.base import EraserModule
from evaluation.attacks.base import (
    ASR, AttackConfig, AttackConfigError, AttackResult, Target, attacker_rows, first_last, original_images, record_loss,
)
from evaluation.metrics import INTERVAL, accuracy_with_interval
from evaluation.suites import Prompt


def relearned_parameters(module: EraserModule) -> tuple[dict[str, torch.nn.Parameter], str]:
    """The tensors relearning fine-tunes and in words which they are."""
    if module.trained:
        return dict(module.trained), "the method's trained tensors"
    chosen = {f"{name}.{key}": p for name, layer in matching_modules(module.denoiser, CROSS_ATTENTION_KV)
              for key, p in layer.named_parameters(recurse=False)}
    layers = "attn.add_k_proj/add_v_proj" if isinstance(module.family, Flux) else "attn2.to_k/to_v"
    return chosen, f"{layers} (the method changes no tensor)"


def fine_tune(module: EraserModule, parameters: Sequence[torch.nn.Parameter], latents: torch.Tensor,
              prompts: Sequence[str], config: AttackConfig, generator: torch.Generator, steps: int,
              at: Callable[[int], None] = lambda step: None) -> list[float]:
    """``steps`` Adam steps of the plain denoising loss on (prompt, latent) pairs; ``at(k)`` after
    k steps, k = 0 included. Returns the loss per step."""
    optimizer = torch.optim.Adam(parameters, lr=config.relearn.lr)
    losses = []
    at(0)
    for step in tqdm(range(1, steps + 1), desc="relearn", unit="step", disable=steps == 0):
        picks = torch.randint(len(latents), (config.batch_size,), generator=generator).tolist()
        loss = module.denoising_loss(latents[picks], module.encode([prompts[i] for i in picks]), generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        record_loss(losses, loss, "relearn", "relearn.lr")
        at(step)
    return losses


def choose_control(config: AttackConfig, candidates: Sequence[str], erased: Sequence[str], rows: Sequence[Prompt],
                   concept_word: Callable[[str], str], seen: Callable[[str], float]) -> tuple[str | None, str]:
    """(the control concept or None, why)."""
    if config.relearn.control == "none":
        return None, "no control (attack.relearn.control=none)"
    missing = [r.prompt for r in rows if concept_word(r.concept) not in r.prompt]
    if missing:
        return None, f"no control: the target prompt '{missing[0]}' does not name its concept's word to replace"
    if config.relearn.control != "auto":
        control = config.relearn.control
        if control in erased:
            raise AttackConfigError(f"attack.relearn.control '{control}' is an erased concept; "
                                    "name a concept the method kept, or auto")
        try:
            before = seen(control)
        except ValueError as error:  # the evaluator does not know it
            raise AttackConfigError(f"attack.relearn.control '{control}': {str(error).splitlines()[0]}") from None
        return control, f"attack.relearn.control ({before:.2f} before fine-tuning)"
    options = [c for c in dict.fromkeys(candidates) if c not in erased]
    if not options:
        return None, "no control: the run has no retained concept"
    rates = {c: seen(c) for c in options}
    choice = min(options, key=lambda c: rates[c])
    return choice, (f"auto: the retained concept the erased model shows least on the target prompts before "
                    f"fine-tuning ({rates[choice]:.2f})")


def attack(target: Target, config: AttackConfig) -> AttackResult:
    """Fine-tune towards the concept and towards the control; the images are those after the last
    count, the fields hold the success rate after each count and the control's."""
    module, rows, sampler, evaluator = target.module, target.rows, target.sampler, target.evaluator
    concept_word, controls = target.concept_word, target.controls
    checkpoints = sorted(set(config.relearn.steps))
    generator_seed = config.seed
    prompts, seeds, concepts = target.prompts, target.seeds, target.concepts
    data_rows = attacker_rows(rows, config.images)
    sent, _ = module.prompts_for_generation([r.prompt for r in data_rows])
    target_latents = module.encode_images(original_images(module, data_rows, sampler))

    parameters, which = relearned_parameters(module)
    erased_values = {name: p.detach().clone() for name, p in parameters.items()}
    module.requires_grad_(False)

    def restore() -> None:
        with torch.no_grad():
            for name, p in parameters.items():
                p.copy_(erased_values[name])

    def branch(latents: torch.Tensor, measure: Callable[[torch.Tensor], dict]) -> tuple[list[dict], torch.Tensor, list[float]]:
        restore()
        results, last = [], {}

        def at(step: int) -> None:
            if step in checkpoints:
                last["images"] = step0 if step == 0 and step0 is not None else module.generate(prompts, seeds, sampler)
                results.append(measure(last["images"]))

        generator = torch.Generator().manual_seed(generator_seed)
        for p in parameters.values():
            p.requires_grad_(True)
        try:
            losses = fine_tune(module, list(parameters.values()), latents, sent, config, generator, checkpoints[-1], at)
        finally:
            for p in parameters.values():
                p.requires_grad_(False)
        return results, last["images"], losses

    def rate(images: torch.Tensor, concept_list: list[str]) -> dict:
        return accuracy_with_interval(evaluator, images, concept_list, "rate")

    step0 = None
    try:
        step0 = module.generate(prompts, seeds, sampler)  # the erased model (K = 0)
        control, why = choose_control(config, controls, module.concepts, rows, concept_word,
                                      lambda c: float(evaluator.sees(step0, [c] * len(step0)).float().mean()))
        if control is not None:  # the control's data before any weight moves: the original model's images
            swapped = [r.prompt.replace(concept_word(r.concept), concept_word(control)) for r in data_rows]
            control_latents = module.encode_images(original_images(module, data_rows, sampler, prompts=swapped))
        curve, images, losses = branch(target_latents, lambda im: rate(im, concepts))
        control_result = None
        if control is not None:
            control_curve, _, control_losses = branch(control_latents, lambda im: rate(im, [control] * len(im)))
            control_result = {
                "concept": control, "why": why, "success_rate_by_step": [c["rate"] for c in control_curve],
                f"success_rate_by_step{INTERVAL}": [c[f"rate{INTERVAL}"] for c in control_curve],
                "loss_first_last": first_last(control_losses),
                "example_data_prompt": f"{sent[0]} <- images of '{swapped[0]}'",
            }
    finally:
        restore()
    count = sum(p.numel() for p in parameters.values())
    fields = {
        ASR: curve[-1]["rate"], ASR + INTERVAL: curve[-1][f"rate{INTERVAL}"],
        "relearn_steps": checkpoints,
        f"{ASR}_by_step": [c["rate"] for c in curve], f"{ASR}_by_step{INTERVAL}": [c[f"rate{INTERVAL}"] for c in curve],
        "control": control_result if control_result is not None else {"concept": None, "why": why},
        "relearned_tensors": f"{len(parameters)} tensors, {count} values: {which}",
    }
    label = [f"{p} [after {checkpoints[-1]} relearn steps]" for p in prompts]
    return AttackResult(images, label, losses, fields)

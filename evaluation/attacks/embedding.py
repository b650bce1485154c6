"""The embedding attack: a white-box upper bound that optimises what the UNet's cross-attention reads.

For each attacked target prompt p (as the erased model receives it: after the instruction
baseline's rewriting) let E_p = tau(p) in R^{L x d} be the text encoder's output, the hidden states
every cross-attention layer of the UNet attends to, and F_p the free positions
(``attack.embedding.positions``):

    concept+end  the tokens of the concept's word in p (every occurrence), the end-of-text token and
                 every position after it (the padding the UNet also attends to);
    all          all L positions.

The attack solves, with the erased model's weights frozen,

    min_{e_p}  E_{x_0 ~ D_p, eps ~ N(0, I), t ~ U{0..T-1}}  || eps_erased(x_t, t, E_p[F_p <- e_p]) - eps ||^2
    subject to ||e_{p,i}|| = ||E_{p,i}||  for every free position i   (``attack.embedding.keep_norm``, default)
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,  e_p initialised to E_p[F_p],

(eps replaced by v for v-prediction models, by eps - x_0 for FLUX: :meth:`EraserModule.denoising_loss`), where
D_p are the original model's images of p (the attacker's data: ``attack.images`` images in all,
the attacked prompts in turn, at least one each). Every optimisation step is one Adam step
(``attack.embedding.lr``) for every prompt, each on ``attack.batch_size`` draws of its own images,
followed by the projection back onto the norm constraint. The constraint keeps each free position
at the scale the encoder's final layer norm gives its outputs, the scale cross-attention was
trained on: unconstrained, the free positions drift off it, and the guided samples degrade even on
the original model (measured in docs/attacks.md): the objective is the denoising loss, not the guided
samples the evaluator sees.
The attacked images are generated through the method's own generation path (its prompt
rewriting, negative prompts, guidance) with E_p[F_p <- e_p] substituted for the text encoder's
output of p, the same prompts and seeds as the evaluation, at the start (e_p = E_p: the erased
model's own images), every ``attack.embedding.check_every`` steps and after the last. As in
UnlearnDiffAtk's protocol an evaluation image counts as recovered if the evaluator sees the concept
at any of these checkpoints (the attacker keeps the best conditioning it has found), so the attack
success rate is at least the erased model's own target accuracy (``pre_attack_success_rate``);
``attack_success_rate_by_step`` gives each checkpoint's share alone. The checkpoints matter
because the denoising objective is not what the evaluator sees: on the original model the
guided samples' concept fades as the steps go (docs/attacks.md).

No prompt reaches these embeddings in general (they need not be the encoding of any token
sequence), so the attack success rate is an upper bound on what text-side attacks (inversion,
soft prompts, discrete search) can recover: a method that survives it has moved the concept out of
the UNet's reach from the text side; one that fails it still draws the concept for *some*
conditioning. The prompt's other positions keep their values (the text encoder is causal: the
positions after the concept's word still carry it; ``all`` frees them too).

Families: E_p is the token context the denoiser reads (``Conditioning.embeds``): SDXL's two CLIPs'
hidden states concatenated (the first CLIP tokenizer's positions; the second tokenises alike),
FLUX's T5 states (T5 tokenizer positions: no BOS, ``</s>`` ends the words, the padding after it is
attended to as well). The pooled vectors (SDXL's ``text_embeds``, FLUX's ``pooled_projections``)
stay as the prompt encodes them: the attack frees the context only. FLUX's T5 is not causal, so
there every position carries the concept's word.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from erasure.families import Conditioning, StableDiffusion
from erasure.methods.base import EraserModule
from evaluation.attacks.base import (
    AttackConfig, AttackResult, Recovery, Target, attacker_rows, original_images, record_loss,
)

MAX_UNET_BATCH = 32  # samples per UNet call of one step (a step's gradients are accumulated over calls)


def sublist_positions(sequence: Sequence[int], pattern: Sequence[int]) -> list[int]:
    """Every index covered by an occurrence of ``pattern`` in ``sequence``."""
    width = len(pattern)
    found: set[int] = set()
    if width == 0:
        return []
    for start in range(len(sequence) - width + 1):
        if list(sequence[start:start + width]) == list(pattern):
            found.update(range(start, start + width))
    return sorted(found)


def free_positions(tokenizer, prompt: str, word: str, mode: str,
                   length: int | None = None) -> tuple[list[int], list[int]]:
    """(token ids of the prompt as the pipeline encodes it, padded to ``length`` (default the
    tokenizer's ``model_max_length``), its free positions under ``mode``). The end is the first
    end-of-text token after the BOS (CLIP: [BOS, words, EOS, padding]; T5 has no BOS: [words, </s>,
    padding])."""
    ids = tokenizer(prompt, padding="max_length", max_length=length or tokenizer.model_max_length,
                    truncation=True).input_ids
    if mode == "all":
        return ids, list(range(len(ids)))
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    first = int(tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    end = next((i for i in range(first, len(ids)) if ids[i] == eos), len(ids) - 1)
    concept = [i for i in sublist_positions(ids, word_ids) if i < end]
    return ids, sorted(set(concept) | set(range(end, len(ids))))


class FreeEmbeddings:
    """The attacked prompts' conditionings, with the free positions of their token contexts (what the
    denoiser attends to) as trainable tensors; pooled vectors (SDXL, FLUX) stay as encoded."""

    def __init__(self, module: EraserModule, prompts: Sequence[str], words: Sequence[str], mode: str):
        self.module = module
        self.prompts = list(dict.fromkeys(prompts))
        word_of = dict(zip(prompts, words))
        tokenizer = module.family.context_tokenizer
        with torch.no_grad():
            self.condition = module.encode(self.prompts, cache=False).detach()
        self.ids, self.positions, self.free = [], [], []
        for k, prompt in enumerate(self.prompts):
            ids, positions = free_positions(tokenizer, prompt, word_of[prompt], mode, self.context_length)
            index = torch.tensor(positions, dtype=torch.long, device=self.condition.embeds.device)
            self.ids.append(tuple(ids))
            self.positions.append(index)
            self.free.append(torch.nn.Parameter(self.condition.embeds[k, index].clone()))
        self.norms = [f.detach().norm(dim=-1, keepdim=True) for f in self.free]

    @property
    def context_length(self) -> int:
        """Positions of a prompt's token context."""
        return self.condition.embeds.shape[1]

    @torch.no_grad()
    def keep_norms(self) -> None:
        """Put every free position back on the sphere of its initial norm (the encoder's own scale)."""
        for free, norm in zip(self.free, self.norms):
            free.mul_(norm / free.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def context(self, k: int) -> torch.Tensor:
        """(L, d): prompt ``k``'s token context with its free positions substituted."""
        return self.condition.embeds[k].index_put((self.positions[k],), self.free[k])

    def embeds(self, owners: Sequence[int]) -> Conditioning:
        """The conditionings of prompts ``owners``, their contexts substituted (:meth:`context`)."""
        owners = list(owners)
        return replace(self.condition[owners], embeds=torch.stack([self.context(k) for k in owners]))

    def substituted(self) -> contextlib.AbstractContextManager:
        """While open, the pipeline encodes these prompts to their attacked contexts (and every other
        input as usual): any generation path sees the attack. SD-1.x/2.x: a hook on the text encoder,
        keyed by the prompt's token ids; SDXL and FLUX: the pipeline's ``encode_prompt``, keyed by the
        prompt (their context is not one encoder's output)."""
        if isinstance(self.module.family, StableDiffusion):
            return self.substituted_encoder_output()
        return self.substituted_encode_prompt()

    @contextlib.contextmanager
    def substituted_encoder_output(self) -> Iterator[None]:
        """The text encoder returns the attacked context for these prompts' token ids."""
        table = {ids: k for k, ids in enumerate(self.ids)}

        def hook(_module, args, kwargs, output):
            input_ids = args[0] if args else kwargs.get("input_ids")
            rows = [(r, table.get(tuple(row))) for r, row in enumerate(input_ids.tolist())]
            rows = [(r, k) for r, k in rows if k is not None]
            if not rows:
                return output
            hidden = output[0].clone()
            with torch.no_grad():
                for r, k in rows:
                    hidden[r] = self.context(k).to(hidden)
            if isinstance(output, tuple):  # return_dict=False
                return (hidden, *output[1:])
            output["last_hidden_state"] = hidden
            return output

        handle = self.module.pipeline.text_encoder.register_forward_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def substituted_encode_prompt(self) -> Iterator[None]:
        """The pipeline instance's ``encode_prompt`` returns the attacked context as the rows of these
        prompts in its first output (the prompts' token context; SDXL's and FLUX's tuples both start
        with it), the rest (pooled vectors, negative prompts' encodings) as encoded."""
        pipeline = self.module.pipeline
        encode_prompt = pipeline.encode_prompt
        signature = inspect.signature(encode_prompt)
        table = {prompt: k for k, prompt in enumerate(self.prompts)}

        def substituted(*args, **kwargs):
            output = encode_prompt(*args, **kwargs)
            arguments = signature.bind(*args, **kwargs)
            arguments.apply_defaults()
            prompts = arguments.arguments["prompt"]
            prompts = [prompts] if isinstance(prompts, str) else prompts or []
            copies = arguments.arguments["num_images_per_prompt"]
            rows = [(r, table[prompt]) for r, prompt in enumerate(prompts) if prompt in table]
            if not rows:
                return output
            context = output[0].clone()
            with torch.no_grad():
                for r, k in rows:
                    context[r * copies:(r + 1) * copies] = self.context(k).to(context)
            return (context, *output[1:])

        pipeline.encode_prompt = substituted
        try:
            yield
        finally:
            del pipeline.encode_prompt


def optimise(module: EraserModule, free: FreeEmbeddings, latents: torch.Tensor, owners: Sequence[int],
             config: AttackConfig, generator: torch.Generator, steps: int,
             checkpoint: Callable[[int], None] = lambda step: None) -> list[float]:
    """``steps`` Adam steps on every prompt's free embeddings, calling ``checkpoint(step)`` every
    ``attack.embedding.check_every`` steps and after the last; returns the mean loss per step."""
    by_prompt = [[i for i, o in enumerate(owners) if o == k] for k in range(len(free.prompts))]
    optimizer = torch.optim.Adam(free.free, lr=config.embedding.lr)
    losses = []
    for step in tqdm(range(1, steps + 1), desc="embedding", unit="step"):
        picks = [(k, mine[int(j)]) for k, mine in enumerate(by_prompt) if mine
                 for j in torch.randint(len(mine), (config.batch_size,), generator=generator)]
        optimizer.zero_grad()
        total = 0.0
        for start in range(0, len(picks), MAX_UNET_BATCH):
            chunk = picks[start:start + MAX_UNET_BATCH]
            loss = module.denoising_loss(latents[[i for _, i in chunk]], free.embeds([k for k, _ in chunk]), generator)
            (loss * len(chunk) / len(picks)).backward()
            total += float(loss.detach()) * len(chunk) / len(picks)
        optimizer.step()
        if config.embedding.keep_norm:
            free.keep_norms()
        record_loss(losses, total, "embedding", "embedding.lr")
        if step % config.embedding.check_every == 0 or step == steps:
            checkpoint(step)
    return losses


def attack(target: Target, config: AttackConfig) -> AttackResult:
    """Optimise each target prompt's free encoder outputs; generate the target prompts with them at
    every checkpoint."""
    module, rows = target.module, target.rows
    module.requires_grad_(False)  # the erased model is frozen: only the free embeddings train
    generator = torch.Generator().manual_seed(config.seed)
    # each attacked prompt needs images of its own: attack.images in all, at least one per prompt
    data_rows = attacker_rows(rows, max(config.images, len(rows)))
    latents = module.encode_images(original_images(module, data_rows, target.sampler))
    sent, _ = module.prompts_for_generation([r.prompt for r in rows])
    words = [target.concept_word(r.concept) for r in rows]
    free = FreeEmbeddings(module, sent, words, config.embedding.positions)
    index = {prompt: k for k, prompt in enumerate(free.prompts)}
    owners = [index[sent[k % len(rows)]] for k in range(len(data_rows))]
    label = f" [encoder output optimised at {config.embedding.positions}, step {{step}}]"

    def generated(step: int) -> tuple[torch.Tensor, list[str]]:
        with free.substituted():
            images = module.generate(target.prompts, target.seeds, target.sampler)
        return images, [p + label.format(step=step) for p in target.prompts]

    recovery = Recovery(target, *generated(0))
    by_step = {0: recovery.before}

    def checkpoint(step: int) -> None:
        images, prompts = generated(step)
        by_step[step] = recovery.check(range(len(prompts)), images, prompts)

    losses = optimise(module, free, latents, owners, config, generator, config.steps, checkpoint)
    counts = [len(p) for p in free.positions]
    fields = {**recovery.fields(), "checkpoint_steps": list(by_step),
              "attack_success_rate_by_step": [round(float(seen.float().mean()), 4) for seen in by_step.values()],
              "free_positions": f"{config.embedding.positions}: {min(counts)}-{max(counts)} of "
                                f"{free.context_length} positions per prompt",
              "attacker_images": len(data_rows)}
    return AttackResult(recovery.images, recovery.prompts, losses, fields)

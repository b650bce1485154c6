"""Unified Concept Editing (UCE; Gandikota et al., WACV 2024) and TIME (Orgad et al., ICCV 2023).

A closed-form edit of every cross-attention projection W (``attn2.to_k``, ``attn2.to_v``).
With erase keys c_i (text embeddings of the erased concepts), guide values v_i = W_old g_i
(g_i the embeddings of the guide concepts, default the empty prompt), preserve keys c_j,
regulariser lambda and scales s_e, s_p, UCE minimises

    lambda ||W - W_old||^2 + s_e sum_i ||W c_i - v_i||^2 + s_p sum_j ||W c_j - W_old c_j||^2,

whose solution is

    W = (lambda W_old + s_e sum_i v_i c_i^T + s_p sum_j W_old c_j c_j^T)
        (lambda I + s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T)^-1.

Because v_i = W_old g_i, the solution is W = W_old T with one d x d matrix
T = (lambda I + s_e sum_i g_i c_i^T + s_p sum_j c_j c_j^T)(lambda I + s_e sum_i c_i c_i^T + ...)^-1
shared by all projections, solved once in float64.

Which tokens give the keys (``token_mode``) differs between UCE's code versions: ``last`` the
last word token (current code), ``last+eot`` the last word token and every position after it
(the end and padding tokens; the paper code's erase and guide keys), ``all`` every position.
The paper code preserved differently from how it erased: every token position of each preserve
prompt (``preserve_token_mode=all``; default: the same as ``token_mode``), "" always in the
preserve set (``preserve_empty=true``) and preserve scale max(0.1, 1/N) for N preserved
concepts (``preserve_scale=null``). The current code, and the default here, preserve with the
erase keys' tokens, no "", and scale 1.

TIME is the same solve with token-aligned keys: source prompts as erase keys, destination
prompts as guides, lambda = 0.1, token_mode ``all`` (``recipes/time.yaml``).

SDXL: the keys are the cross-attention context as the UNet sees it, both text encoders' hidden
states concatenated (2048-d), the empty prompt's zero when the pipeline zeroes it.

FLUX has no cross-attention. The UCE authors' FLUX edit (``method.flux_edit=authors``, the default;
rohitgandikota/unified-concept-editing, ``trainscripts/uce_flux_edit.py``, commit ea9644f) edits the two
linear layers through which the prompt enters the transformer: ``context_embedder`` (T5 states -> text
stream) with keys the T5 state of each prompt's last word token (index = T5 attention-mask length - 2,
which for "" wraps to the last padded position), and ``time_text_embed.text_embedder.linear_1`` (pooled
CLIP vector -> the modulation of every block) with the pooled vector as the key. The same objective is
solved for each layer with its own keys, in float64, at the sequence length the model samples with (the
authors: 256 for schnell, 512 for dev; :attr:`erasure.families.Flux.max_sequence_length`). Their code
takes the guide outputs with the layers' biases (v = W_old g + b) and so maps a concept to
W_old g + 2b; here v = W_old g, the biases cancel and only the weights change.

``method.flux_edit=per-block`` is this project's own variant (not the authors'): the text stream's key
and value projections ``attn.add_k_proj``/``add_v_proj`` of every double-stream block. Their input is
the text stream entering that block (T5 states after ``context_embedder``, the earlier blocks and the
block's timestep-modulated norm), so the keys are recorded per block by forward hooks while the frozen
transformer predicts on seeded noise at ``key_timesteps`` timesteps evenly over the sampling schedule
(rows of all of them, so the edit holds along the trajectory), and T is solved per block. It leaves
the pooled path alone.

This is a LightningModule with manual optimization: its single training step is the edit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from erasure import layers
from erasure.families import Flux, StableDiffusion
from erasure.methods.base import EraserModule, MethodConfig

SHARED = ""  # the key space of SD and SDXL: every edited projection reads the same context

TOKEN_MODES = ("last", "last+eot", "all")
EDITS = {"kv": layers.CROSS_ATTENTION_KV, "v": layers.CROSS_ATTENTION_V}
FLUX_EDITS = ("authors", "per-block")
FLUX_CONTEXT = "context_embedder"  # T5 states -> the text stream
FLUX_POOLED = "time_text_embed.text_embedder.linear_1"  # pooled CLIP vector -> every block's modulation
# The UCE authors' edit: attn2 to_k/to_v on a UNet, the two text-input layers on FLUX
AUTHORS_FLUX = layers.Region(layers.CROSS_ATTENTION_KV.unet,
                             (r"^(context_embedder|time_text_embed\.text_embedder\.linear_1)$", None))


@dataclass
class UCEConfig(MethodConfig):
    name: str = "uce"
    edit: str = "kv"  # kv: to_k and to_v; v: values only
    guide: list[str] = field(default_factory=lambda: [""])  # one guide, or one per erased concept
    preserve: list[str] = field(default_factory=list)  # erased concepts are dropped from this list
    lam: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float | None = 1.0  # null: max(0.1, 1/N) for N preserved concepts (paper code)
    token_mode: str = "last"
    preserve_token_mode: str | None = None  # null: token_mode; "all": every position (paper code)
    preserve_empty: bool = False  # also preserve "" (paper code)
    prompt_template: str = "{concept}"
    flux_edit: str = "authors"  # FLUX: authors (context_embedder, text_embedder.linear_1) | per-block (add_k/v_proj)
    key_timesteps: int = 4  # FLUX per-block: timesteps at which each block's text-stream keys are recorded


def uce_transform(erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor, lam: float,
                  erase_scale: float, preserve_scale: float) -> torch.Tensor:
    """T with W_new = W_old T, for keys as rows: erase (n_e, d), guide (n_e, d), preserve (n_p, d); float64."""
    erase, guide, preserve = erase.double(), guide.double(), preserve.double()
    identity = torch.eye(erase.shape[1], dtype=torch.float64, device=erase.device)
    keys = lam * identity + erase_scale * erase.T @ erase + preserve_scale * preserve.T @ preserve
    mixed = lam * identity + erase_scale * guide.T @ erase + preserve_scale * preserve.T @ preserve
    # W_new = W_old mixed keys^-1; keys is symmetric, so T = mixed keys^-1 = solve(keys, mixed^T)^T
    return torch.linalg.solve(keys, mixed.T).T


def edit_weight(weight: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """W_old T, computed as W_old + W_old (T - I): the float64 solution's update is applied in the
    weight's precision, so rounding is relative to the (small) update, not to W."""
    update = transform - torch.eye(transform.shape[0], dtype=transform.dtype, device=transform.device)
    return weight + weight @ update.to(weight.dtype)


class UCE(EraserModule):
    name = "uce"
    Config = UCEConfig
    choices = {**EraserModule.choices, "token_mode": TOKEN_MODES, "preserve_token_mode": (None, *TOKEN_MODES),
               "edit": tuple(EDITS), "flux_edit": FLUX_EDITS}
    needs = {"prompt_template": "concept_prompt", "guide": "guide", "preserve": "preserve"}
    # the paper's settings: objects and nudity guided to "" with no preserve set, artists guided to "art"
    by_concept_kind = {"style": {"method": {"guide": ["art"]}}, "object": {"method": {"guide": [""], "preserve": []}},
                       "nudity": {"method": {"guide": [""], "preserve": []}}}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    @classmethod
    def check(cls, config: UCEConfig, concepts: Sequence[str]) -> None:
        if len(config.guide) not in (1, len(concepts)):
            raise ValueError(f"method.guide has {len(config.guide)} entries for {len(concepts)} concepts; "
                             "give one guide for all or one per erased concept")

    @property
    def authors_flux(self) -> bool:
        """Whether this is the UCE authors' FLUX edit (``flux_edit=authors`` on a FLUX model)."""
        return isinstance(self.family, Flux) and self.config.flux_edit == "authors"

    def trained_layers(self) -> layers.Region:
        if self.authors_flux:
            if self.config.edit != "kv":
                raise ValueError(f"method.edit={self.config.edit} has no counterpart in the UCE authors' FLUX edit "
                                 "(context_embedder, text_embedder.linear_1); use method.flux_edit=per-block")
            return AUTHORS_FLUX
        return EDITS[self.config.edit]

    def configure_optimizers(self):
        return None

    @torch.no_grad()
    def keys(self, prompts: Sequence[str], token_mode: str | None = None) -> dict[str, list[torch.Tensor]]:
        """Per key space (:data:`SHARED` for SD and SDXL; for FLUX the edited layer, or each double-stream
        block's ``attn`` per block), per prompt, the keys (n_tokens, d) at the positions ``token_mode``
        (default the config's) selects (FLUX per block: (timesteps, n_tokens, d); the pooled key: (1, d)).

        SD's text encoder is causal, so the embedding at position i depends on tokens 0..i only:
        for ``last`` the prompts are encoded in one batch, only up to the longest last-word
        position (a few tokens instead of the full context); the other modes read the whole context.
        """
        if not prompts:
            return {space: [] for space in self.key_spaces()}
        tokenizer = self.family.context_tokenizer
        ids = tokenizer(list(prompts), truncation=True, max_length=tokenizer.model_max_length).input_ids
        # [BOS, words..., EOS] (CLIP) or [words..., EOS] (T5): the last word is at length - 2 (or 0)
        last_words = [max(len(i) - 2, 0) for i in ids]
        token_mode = token_mode or self.config.token_mode
        if token_mode == "last" and isinstance(self.family, StableDiffusion):
            width = max(last_words) + 1
            batch = torch.tensor([(i + [tokenizer.pad_token_id] * width)[:width] for i in ids], device=self.device)
            embeds = self.text_encoder(batch).last_hidden_state
            return {SHARED: [embed[last:last + 1] for embed, last in zip(embeds, last_words)]}
        select = {"last": lambda last: slice(last, last + 1), "last+eot": lambda last: slice(last, None),
                  "all": lambda last: slice(0, None)}[token_mode]
        if self.authors_flux:
            condition = self.encode(prompts)
            length = condition.embeds.shape[1]
            # the authors' index, attention-mask length - 2, as Python reads it: "" gives -1, the last position
            last_words = [(len(i) - 2) % length for i in ids]
            return {FLUX_CONTEXT: [embed[select(last), :] for embed, last in zip(condition.embeds, last_words)],
                    FLUX_POOLED: [pooled[None] for pooled in condition.pooled]}
        contexts = self.flux_keys(prompts) if isinstance(self.family, Flux) else {SHARED: self.encode(prompts).embeds}
        return {space: [embed[..., select(last), :] for embed, last in zip(context, last_words)]
                for space, context in contexts.items()}

    def key_spaces(self) -> list[str]:
        """:data:`SHARED`, or for FLUX the edited layers (authors) or the ``attn`` module of every block whose
        projections are edited (per block)."""
        return list(dict.fromkeys(self.key_space(name) for name in self.trained))

    def key_space(self, name: str) -> str:
        """The key space of trained tensor ``name``: :data:`SHARED`; for FLUX its layer (authors:
        ``context_embedder.weight`` -> ``context_embedder``) or its block's ``attn`` (per block:
        ``transformer_blocks.0.attn.add_k_proj.weight`` -> ``transformer_blocks.0.attn``)."""
        if not isinstance(self.family, Flux):
            return SHARED
        return name.rsplit(".", 1)[0] if self.authors_flux else name.rsplit(".", 2)[0]

    def flux_keys(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per edited block, the text stream entering its add_k_proj/add_v_proj: (prompts, timesteps,
        tokens, width), recorded while the frozen transformer predicts on seeded noise at the config's
        ``key_timesteps`` timesteps, evenly over the sampling schedule."""
        spaces = self.key_spaces()
        recorded: dict[str, list[torch.Tensor]] = {space: [] for space in spaces}
        modules = dict(self.denoiser.named_modules())
        handles = [modules[f"{space}.add_k_proj"].register_forward_hook(
            lambda _module, args, _output, space=space: recorded[space].append(args[0])) for space in spaces]
        condition = self.encode(prompts)
        schedule = self.family.sampling_scheduler(self.config.key_timesteps).timesteps
        generator = torch.Generator().manual_seed(self.seed)
        shape = (len(prompts), self.family.latent_channels, self.latent_size, self.latent_size)
        noise = torch.randn(shape, generator=generator).to(self.device, condition.embeds.dtype)
        try:
            for t in schedule:
                self.predict(noise, t.to(self.device), condition)
        finally:
            for handle in handles:
                handle.remove()
        return {space: torch.stack(inputs, dim=1) for space, inputs in recorded.items()}

    def edit_keys(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per key space, (erase keys, aligned guide keys, preserve keys) as stacked rows."""
        config = self.config
        prompts = [config.prompt_template.format(concept=c) for c in self.concepts]
        guides = config.guide if len(config.guide) == len(prompts) else config.guide * len(prompts)
        kept = [config.prompt_template.format(concept=c) for c in config.preserve if c not in self.concepts]
        kept += [""] if config.preserve_empty else []
        concept_keys, guide_keys = self.keys(prompts), self.keys(guides)
        preserve_keys = self.keys(kept, config.preserve_token_mode)
        solved = {}
        for space in concept_keys:
            erase, guide = [], []
            for concept, target in zip(concept_keys[space], guide_keys[space]):
                count = min(concept.shape[-2], target.shape[-2])  # align from the first selected token
                erase.append(concept[..., :count, :].flatten(0, -2))
                guide.append(target[..., :count, :].flatten(0, -2))
            width = erase[0].shape[-1]
            preserve = (torch.cat([k.flatten(0, -2) for k in preserve_keys[space]]) if kept
                        else torch.zeros(0, width, device=self.device))
            solved[space] = torch.cat(erase), torch.cat(guide), preserve
        return solved

    def preserve_scale(self) -> float:
        """s_p: the configured scale, or max(0.1, 1/N) for N preserved concepts (paper code) when null."""
        if self.config.preserve_scale is not None:
            return self.config.preserve_scale
        count = len([c for c in self.config.preserve if c not in self.concepts]) + int(self.config.preserve_empty)
        return max(0.1, 1.0 / max(count, 1))

    @torch.no_grad()
    def edit(self) -> dict[str, float]:
        """Encode the keys, solve for T once per key space (float64), write W_old T into every edited
        projection's weight.

        Returns the seconds of each phase: encoding, solve, write.
        """
        started = time.perf_counter()
        keys = self.edit_keys()
        encoded = time.perf_counter()
        transforms = {space: uce_transform(erase, guide, preserve, self.config.lam, self.config.erase_scale,
                                           self.preserve_scale())
                      for space, (erase, guide, preserve) in keys.items()}
        solved = time.perf_counter()
        for name, weight in self.trained.items():
            if name.endswith(".weight"):  # biases cancel (module docstring)
                weight.copy_(edit_weight(self.original[name], transforms[self.key_space(name)]))
        written = time.perf_counter()
        return {"encoding": encoded - started, "solve": solved - encoded, "write": written - solved}

    def training_step(self, step: int, batch_idx: int) -> None:
        seconds = self.edit()
        self.log_dict({"train/edited_matrices": float(len(self.trained)),
                       **{f"train/{phase}_s": value for phase, value in seconds.items()}})
        self.trainer.should_stop = True  # the edit is done in one step

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

This is a LightningModule with manual optimization: its single training step is the edit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from erasure import layers
from erasure.methods.base import EraserModule, MethodConfig

TOKEN_MODES = ("last", "last+eot", "all")
EDITS = {"kv": layers.CROSS_ATTENTION_KV, "v": layers.CROSS_ATTENTION_V}


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
               "edit": tuple(EDITS)}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    @classmethod
    def check(cls, config: UCEConfig, concepts: Sequence[str]) -> None:
        if len(config.guide) not in (1, len(concepts)):
            raise ValueError(f"method.guide has {len(config.guide)} entries for {len(concepts)} concepts; "
                             "give one guide for all or one per erased concept")

    def trained_layers(self) -> layers.Selector:
        return EDITS[self.config.edit]

    def configure_optimizers(self):
        return None

    @torch.no_grad()
    def keys(self, prompts: Sequence[str], token_mode: str | None = None) -> list[torch.Tensor]:
        """Per prompt, the text embeddings (n_tokens, d) at the positions ``token_mode`` (default the
        config's) selects.

        The text encoder is causal, so the embedding at position i depends on tokens 0..i only:
        for ``last`` the prompts are encoded in one batch, only up to the longest last-word
        position (a few tokens instead of the full context); the other modes read the whole context.
        """
        tokenizer = self.pipeline.tokenizer
        ids = tokenizer(list(prompts), truncation=True, max_length=tokenizer.model_max_length).input_ids
        last_words = [max(len(i) - 2, 0) for i in ids]  # [BOS, words..., EOS]: the last word is at length - 2
        token_mode = token_mode or self.config.token_mode
        if token_mode == "last":
            width = max(last_words) + 1
            batch = torch.tensor([(i + [tokenizer.pad_token_id] * width)[:width] for i in ids], device=self.device)
            embeds = self.text_encoder(batch).last_hidden_state
            return [embed[last:last + 1] for embed, last in zip(embeds, last_words)]
        embeds = self.encode(prompts)
        start = 0 if token_mode == "all" else None
        return [embed[last if start is None else start:] for embed, last in zip(embeds, last_words)]

    def edit_keys(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(erase keys, aligned guide keys, preserve keys) as stacked rows."""
        config = self.config
        prompts = [config.prompt_template.format(concept=c) for c in self.concepts]
        guides = config.guide if len(config.guide) == len(prompts) else config.guide * len(prompts)
        erase, guide = [], []
        for concept_keys, guide_keys in zip(self.keys(prompts), self.keys(guides)):
            count = min(len(concept_keys), len(guide_keys))  # align from the first selected token
            erase.append(concept_keys[:count])
            guide.append(guide_keys[:count])
        kept = [config.prompt_template.format(concept=c) for c in config.preserve if c not in self.concepts]
        kept += [""] if config.preserve_empty else []
        width = self.text_encoder.config.hidden_size
        preserve = (torch.cat(self.keys(kept, config.preserve_token_mode)) if kept
                    else torch.zeros(0, width, device=self.device))
        return torch.cat(erase), torch.cat(guide), preserve

    def preserve_scale(self) -> float:
        """s_p: the configured scale, or max(0.1, 1/N) for N preserved concepts (paper code) when null."""
        if self.config.preserve_scale is not None:
            return self.config.preserve_scale
        count = len([c for c in self.config.preserve if c not in self.concepts]) + int(self.config.preserve_empty)
        return max(0.1, 1.0 / max(count, 1))

    @torch.no_grad()
    def edit(self) -> dict[str, float]:
        """Encode the keys, solve for T once (float64), write W_old T into every edited projection.

        Returns the seconds of each phase: encoding, solve, write.
        """
        started = time.perf_counter()
        erase, guide, preserve = self.edit_keys()
        encoded = time.perf_counter()
        transform = uce_transform(erase, guide, preserve, self.config.lam, self.config.erase_scale,
                                  self.preserve_scale())
        solved = time.perf_counter()
        for name, weight in self.trained.items():
            weight.copy_(edit_weight(self.original[name], transform))
        written = time.perf_counter()
        return {"encoding": encoded - started, "solve": solved - encoded, "write": written - solved}

    def training_step(self, step: int, batch_idx: int) -> None:
        seconds = self.edit()
        self.log_dict({"train/edited_matrices": float(len(self.trained)),
                       **{f"train/{phase}_s": value for phase, value in seconds.items()}})
        self.trainer.should_stop = True  # the edit is done in one step

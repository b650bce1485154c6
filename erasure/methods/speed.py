"""SPEED (Li et al., ICLR 2026, "SPEED: Scalable, Precise, and Efficient Concept Erasure for Diffusion
Models"): a closed-form edit of the cross-attention value projections restricted to the null space of what
must be kept. Followed: Ouxiang-Li/SPEED ``train_erase_null.py`` (commit 6d3df0c), the only algorithm file.

For each edited projection W (``attn2.to_v``; ``method.edit=kv`` adds ``to_k``), with target keys e_t (the
last word token of each erased concept, no template), anchor keys e_a (the guide, aligned), retain keys
e_r (the last word token of each kept concept) and invariant keys K_2:

    C_tt = mean_c sum_t e_t e_t^T,   C_at = mean_c sum_t e_a e_t^T   (over each concept c's keys t, mean over c)
    dW_0 = W (C_at - C_tt)(I + C_tt)^-1                                      (UCE's edit, only to score)
    IPF:  keep the e_r with ||dW_0 e_r|| above its mean over the retain set
    DPA:  10 copies e_r + v v^T eps per kept e_r (eps ~ N(0, I); v the last right-singular vector of W in the
          reduced SVD), keeping the copies with ||dW_0 e|| above their batch's mean
    C_rr = mean e e^T over the kept and augmented keys;  P = U_0 U_0^T, U_0 the eigenvectors of C_rr
          with eigenvalue below tau (the retain set's null space)
    IEC:  K_2 = [the empty prompt's start token, 3 k-means centres of its other tokens]
    M = (C_tt P + rho I)^-1
    dW = W (C_at - C_tt) P [I - M K_2 (K_2^T P M K_2 + lambda I)^-1 K_2^T P] M,      W_new = W + dW,

the minimiser of ||(W + dW) e_t - W e_a||^2 + rho ||dW||^2 over dW = D P (so dW C_rr ~ 0: the kept
concepts' outputs stay), with dW K_2 = 0 exactly at lambda = 0 (the empty prompt stays).

Authors' defaults (``recipes/speed.yaml``): values only, 10 augmentations, tau 0.1, rho 1, lambda 0, the
filter on. Their multi-concept script (10-100 celebrities, ``scripts/eval_multi.sh``) sets tau 1e-4, rho 0.05
and turns the filter off: ``method.threshold=1e-4 method.retain_scale=0.05 method.influence_filter=false``.
Their anchor for objects is "" and for styles "art" (``by_concept_kind``); the toy world gives each erased
concept another concept of its attribute, as UCE's guide. Differences
from their code: k-means here is Lloyd's with its first centres drawn by the run's seed (theirs: kmeans_pytorch,
seeded 0) and DPA's batches are 8 keys, as theirs, drawn in order (theirs shuffled first); keys are float64.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from erasure.methods.uce import SHARED, UCE, UCEConfig


@dataclass
class SPEEDConfig(UCEConfig):
    name: str = "speed"
    edit: str = "v"  # the authors' --params V (every released script)
    threshold: float = 0.1  # tau: eigenvalues of C_rr below it span the null space
    retain_scale: float = 1.0  # rho
    invariant_lam: float = 0.0  # lambda of the invariant equality constraint (0: exact)
    augmentations: int = 10  # DPA copies per retain key (0: no augmentation and no filter, as the authors')
    influence_filter: bool = True  # IPF (the authors' --disable_filter turns it off)
    invariant_clusters: int = 3  # k-means centres of the empty prompt's later tokens in K_2


def kmeans(points: torch.Tensor, clusters: int, generator: torch.Generator, iterations: int = 100) -> torch.Tensor:
    """Lloyd's k-means (euclidean) of the rows of ``points``, first centres drawn from them; (clusters, d)."""
    centres = points[torch.randperm(len(points), generator=generator)[:clusters]].clone()
    for _ in range(iterations):
        nearest = torch.cdist(points, centres).argmin(1)
        moved = torch.stack([points[nearest == k].mean(0) if (nearest == k).any() else centres[k]
                             for k in range(clusters)])
        if torch.equal(moved, centres):
            break
        centres = moved
    return centres


def null_space_projector(keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U_0 U_0^T over the eigenvectors of mean_r e_r e_r^T (rows ``keys``) with eigenvalue below ``threshold``."""
    covariance = keys.T @ keys / len(keys)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    null = eigenvectors[:, eigenvalues < threshold]
    return null @ null.T


def influential(keys: torch.Tensor, reference_update: torch.Tensor) -> torch.Tensor:
    """The rows whose output change under the reference update lies above the mean change (IPF)."""
    influence = (keys @ reference_update.T).norm(dim=1)
    return keys[influence > influence.mean()]


def augmented(keys: torch.Tensor, weight: torch.Tensor, reference_update: torch.Tensor, copies: int,
              generator: torch.Generator, batch: int = 8) -> torch.Tensor:
    """DPA: per batch of ``batch`` keys, ``copies`` copies each moved along the last right-singular vector v of W
    (e + v v^T eps), keeping the influential ones (above the batch's mean)."""
    direction = torch.linalg.svd(weight, full_matrices=False).Vh[-1]
    kept = []
    for start in range(0, len(keys), batch):
        chunk = keys[start:start + batch].repeat_interleave(copies, dim=0)
        noise = torch.randn(chunk.shape, generator=generator, dtype=chunk.dtype).to(chunk.device)
        kept.append(influential(chunk + (noise @ direction)[:, None] * direction, reference_update))
    return torch.cat(kept) if kept else keys[:0]


def speed_update(weight: torch.Tensor, target: torch.Tensor, anchor: torch.Tensor, retain: torch.Tensor,
                 invariants: torch.Tensor, config: SPEEDConfig, generator: torch.Generator,
                 concepts: int | None = None) -> torch.Tensor:
    """dW for one projection W (d_out, d), keys as rows (float64): target and anchor (n, d), retain (n_r, d),
    invariants K_2^T (k, d); the covariances are sums over a concept's keys, means over the ``concepts``
    (default: one key each)."""
    weight = weight.double()
    identity = torch.eye(weight.shape[1], dtype=torch.float64, device=weight.device)
    count = concepts or len(target)
    c_tt, c_at = target.T @ target / count, anchor.T @ target / count
    reference = weight @ (c_at - c_tt) @ torch.linalg.inv(identity + c_tt)
    if config.augmentations > 0 and len(retain):
        kept = influential(retain, reference) if config.influence_filter else retain
        retain = torch.cat([kept, augmented(kept, weight, reference, config.augmentations, generator)])
    projector = null_space_projector(retain, config.threshold) if len(retain) else identity
    m = torch.linalg.inv(c_tt @ projector + config.retain_scale * identity)
    k2 = invariants[invariants.norm(dim=1) > 0].T  # a zero key (SDXL's empty prompt) keeps its output under any dW
    if k2.shape[1] == 0:
        return weight @ (c_at - c_tt) @ projector @ m
    inner = k2.T @ projector @ m @ k2 + config.invariant_lam * torch.eye(k2.shape[1], dtype=torch.float64,
                                                                          device=weight.device)
    constraint = identity - m @ k2 @ torch.linalg.solve(inner, k2.T @ projector)
    return weight @ (c_at - c_tt) @ projector @ constraint @ m


class SPEED(UCE):
    name = "speed"
    Config = SPEEDConfig
    families = ("sd", "sdxl")  # one shared key space, as the authors' SD-1.4 code
    by_concept_kind = {"style": {"method": {"guide": ["art"]}}, "object": {"method": {"guide": [""]}},
                       "nudity": {"method": {"guide": [""], "preserve": []}}}

    @torch.no_grad()
    def invariant_keys(self, generator: torch.Generator) -> torch.Tensor:
        """K_2^T: the empty prompt's start-token key and the k-means centres of its later positions; (k, d)."""
        empty = self.keys([""], "all")[SHARED][0].double()
        return torch.cat([empty[:1], kmeans(empty[1:], self.config.invariant_clusters, generator)])

    @torch.no_grad()
    def edit(self) -> dict[str, float]:
        """Keys once; per edited weight its own filtered, augmented retain set and null space; W + dW written."""
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(self.seed)
        target, anchor, retain = (keys.double() for keys in self.edit_keys()[SHARED])
        invariants = self.invariant_keys(generator)
        encoded = time.perf_counter()
        for name, weight in self.trained.items():
            if name.endswith(".weight"):
                update = speed_update(self.original[name], target, anchor, retain, invariants, self.config, generator,
                                      len(self.concepts))
                weight.copy_(self.original[name] + update.to(weight.dtype))
        solved = time.perf_counter()
        return {"encoding": encoded - started, "solve": solved - encoded, "write": 0.0}

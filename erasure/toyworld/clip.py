"""The toy world's CLIP: an image tower and a text tower trained contrastively on renders and
their captions, as CLIP is (Radford et al. 2021), then frozen under the UNet as Stable Diffusion's
text encoder is.

    python -m erasure.toyworld.clip                      # train, measure, write checkpoints/toyworld/clip
    python -m erasure.toyworld.clip --quick --output /tmp/clip   # smoke run, < 1 min

It is a transformers ``CLIPModel`` folder (``config.json``, ``model.safetensors``, the toy tokenizer and a
``CLIPImageProcessor`` for 32x32 images in [-1, 1]): ``CLIPModel.from_pretrained`` and the project's CLIP evaluator
(``evaluation.clip.checkpoint=<folder>``) load it, and its text tower loads as the ``CLIPTextModel`` of
Stable Diffusion's text-encoder slot (``CLIPTextModel.from_pretrained(folder)`` reads the ``text_model.*``
tensors of the same file).

Objective. With image embeddings u_i, caption embeddings v_j (both L2-normalised), temperature tau
(CLIP's learned ``logit_scale`` = 1 / tau) and P_i the captions true of image i,

    L = - 1/B sum_i log sum_{j in P_i} softmax_j(u_i . v_j / tau)          (image -> caption)
        - 1/B sum_j log sum_{i : j in P_i} softmax_i(u_i . v_j / tau)      (caption -> image, true captions)

CLIP's symmetric InfoNCE with every true pair a positive: the toy world has 144 attribute triples, so a
batch holds many images a caption is true of. Each image also brings a hard negative caption, false of
it and phrased like its true one (NegCLIP: Yuksekgonul et al., ICLR 2023, "When and why vision-language
models behave like bags-of-words"; negatives join the image -> caption softmax only): a false absence
claim (its own shape, colour or style said to be absent: "a red shape without any circle" for a red
circle) or the caption of the scene with one attribute changed. Captions come from caption grammar v2
(:mod:`erasure.toyworld.captions`), whose held-out (shape, colour) pairs never meet in an absence clause,
in training nor in the negatives; images are renders and their VAE reconstructions, blurred or noised
as the classifier's are, so the model reads generated images too.

Measured on held-out images (the last 10% of the dataset): zero-shot shape, colour and style accuracy,
and negation retrieval on the held-out pairs: for an image of colour c, "a {c} {s}" against
"a {c} shape without any {s}", the first right when the image shows shape s, the second otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from erasure.bundle import resolve_path
from erasure.generation import to_unit_range
from erasure.io import atomic_directory, atomic_write_text
from erasure.toyworld import architecture as arch
from erasure.toyworld.captions import (
    HELD_OUT_PAIRS, SUFFIX_ABSENCES, Caption, allowed_absent, absence_clause, describe,
)
from erasure.toyworld.pretrain import (
    QUICK, Budget, ClassifierData, fit, scene_of, stage_dataset, stage_vae, warmup_cosine,
)
from erasure.toyworld.tokenizer import shipped_or_new_tokenizer
from erasure.toyworld.world import ATTRIBUTES, COLORS, SHAPES, WORDS, Scene
from evaluation.evaluators import projection

CLIP_FOLDER = "clip"  # beside sd/ and classifier/ in a toy-world model folder


@dataclass(frozen=True)
class ClipBudget:
    steps: int = 2500
    batch: int = 128
    lr: float = 1e-3
    checkpoint_every: int = 250


QUICK_CLIP = ClipBudget(steps=8, batch=16, checkpoint_every=4)


def make_clip(tokenizer) -> CLIPModel:
    """A CLIP whose text tower is the toy world's text-encoder architecture with 4 layers (width 128, 32
    tokens) and whose image tower is a ViT over 32x32 images in 4x4 patches (4 layers of width 128)."""
    text = arch.make_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                                  tokenizer.pad_token_id).config.to_dict()
    text |= {"num_hidden_layers": 4}
    vision = {"image_size": 32, "patch_size": 4, "hidden_size": arch.TEXT_WIDTH, "intermediate_size": 4 * arch.TEXT_WIDTH,
              "num_hidden_layers": 4, "num_attention_heads": 4, "hidden_act": "quick_gelu"}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch.TEXT_WIDTH))


def image_processor() -> CLIPImageProcessor:
    """32x32 RGB, scaled to [-1, 1] (mean and std 0.5), as the toy world's images are."""
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                              image_mean=[0.5] * 3, image_std=[0.5] * 3)


# ----- captions and their truth ---------------------------------------------------------------------
def holds(caption: Caption, scene: Scene) -> bool:
    """Whether a caption is true of a scene: everything it names is there, nothing it calls absent is."""
    present = {scene.shape, scene.color, scene.style}
    return caption.named <= present and not caption.absent & present


VALUES = [value for values in ATTRIBUTES.values() for value in values]


def truth_matrix(captions: list[Caption], scenes: list[Scene]) -> torch.Tensor:
    """(scenes, captions) bool: :func:`holds` for every pair, as two products of indicator matrices."""
    def indicator(sets: list[set[str]]) -> torch.Tensor:
        return torch.tensor([[value in members for value in VALUES] for members in sets], dtype=torch.float32)

    present = indicator([{s.shape, s.color, s.style} for s in scenes])
    named, absent = indicator([c.named for c in captions]), indicator([c.absent for c in captions])
    return ((1 - present) @ named.T + present @ absent.T) == 0


def true_caption(scene: Scene, rng: np.random.Generator) -> Caption:
    """A non-empty caption of the grammar, true of the scene (the empty caption is true of everything)."""
    while not (caption := describe(scene, rng)).text:
        pass
    return caption


def false_caption(scene: Scene, caption: Caption, rng: np.random.Generator) -> Caption:
    """A hard negative for ``caption``: false of ``scene``, phrased like it. Half the time a false absence
    claim (one of the scene's own values said to be absent, unless that pairs a held-out pair), else the
    grammar's caption of the scene with one attribute changed, drawn until it is false of the scene."""
    present = [v for v in (scene.shape, scene.color, scene.style) if allowed_absent(caption.named, v)]
    if present and rng.random() < 0.5:
        value = present[rng.integers(len(present))]
        template = SUFFIX_ABSENCES[rng.integers(len(SUFFIX_ABSENCES))]
        return Caption(absence_clause(caption.text, value, template, rng), caption.named, caption.absent | {value})
    while True:
        attribute = list(ATTRIBUTES)[rng.integers(len(ATTRIBUTES))]
        others = [v for v in ATTRIBUTES[attribute] if v != getattr(scene, attribute)]
        changed = true_caption(replace(scene, **{attribute: others[rng.integers(len(others))]}), rng)
        if not holds(changed, scene):
            return changed


# ----- training --------------------------------------------------------------------------------------
class ContrastiveTraining(L.LightningModule):
    """The objective of the module docstring on (image, label) batches; captions drawn per step."""

    def __init__(self, tokenizer, total_steps: int, lr: float, seed: int):
        super().__init__()
        self.tokenizer, self.total_steps, self.lr = tokenizer, total_steps, lr
        self.clip = make_clip(tokenizer)
        self.rng = np.random.default_rng(seed)

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        """Padded to the batch's longest caption: the causal text tower's pooled (end-token) output does not
        depend on the padding after it."""
        return self.tokenizer(texts, padding="longest", max_length=arch.MAX_TOKENS, truncation=True,
                              return_tensors="pt").input_ids.to(self.device)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        scenes = [scene_of(label) for label in labels]
        positives = [true_caption(scene, self.rng) for scene in scenes]
        negatives = [false_caption(scene, caption, self.rng) for scene, caption in zip(scenes, positives)]
        captions = positives + negatives
        truth = truth_matrix(captions, scenes).to(self.device)
        image = embedded(self.clip.get_image_features(pixel_values=images))
        text = embedded(self.clip.get_text_features(input_ids=self.token_ids([c.text for c in captions])))
        logits = self.clip.logit_scale.exp() * image @ text.T  # (B, 2B)
        image_to_text = -(logits.log_softmax(1).masked_fill(~truth, -torch.inf).logsumexp(1)).mean()
        true_logits, true_truth = logits[:, : len(scenes)], truth[:, : len(scenes)]
        text_to_image = -(true_logits.log_softmax(0).masked_fill(~true_truth, -torch.inf).logsumexp(0)).mean()
        loss = (image_to_text + text_to_image) / 2
        self.log("clip/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, *args) -> None:
        with torch.no_grad():  # CLIP clips the learned temperature at 100
            self.clip.logit_scale.clamp_(0, np.log(100))

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.clip.parameters(), lr=self.lr, weight_decay=0.1)
        return [optimizer], [{"scheduler": warmup_cosine(optimizer, self.total_steps), "interval": "step"}]


def embedded(features) -> torch.Tensor:
    """The L2-normalised projection of ``get_text_features`` / ``get_image_features``."""
    return F.normalize(projection(features), dim=-1)


# ----- measurement -----------------------------------------------------------------------------------
@torch.no_grad()
def text_embeddings(clip: CLIPModel, tokenizer, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=arch.MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    return embedded(clip.get_text_features(input_ids=ids))


@torch.no_grad()
def image_embeddings(clip: CLIPModel, images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 -> normalised image embeddings."""
    return torch.cat([embedded(clip.get_image_features(pixel_values=to_unit_range(chunk)))
                      for chunk in images_uint8.split(1024)])


ZERO_SHOT = {"shape": "a {}", "color": "a {} shape", "style": "a {} shape"}


def zero_shot(clip: CLIPModel, tokenizer, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy of choosing each attribute's value by the nearest prompt (``ZERO_SHOT``); ``images``:
    normalised image embeddings."""
    result = {}
    for k, (name, template) in enumerate(ZERO_SHOT.items()):
        prompts = text_embeddings(clip, tokenizer, [template.format(WORDS[v]) for v in ATTRIBUTES[name]])
        result[name] = float(((images @ prompts.T).argmax(1) == labels[:, k]).float().mean())
    return result


def negation_retrieval(clip: CLIPModel, tokenizer, images: torch.Tensor, labels: torch.Tensor,
                       pairs: tuple[tuple[str, str], ...] = HELD_OUT_PAIRS) -> dict[str, float]:
    """For every (shape s, colour c) of ``pairs`` and every image of colour c (``images``: normalised image
    embeddings): is "a {c} {s}" nearer than "a {c} shape without any {s}" exactly when the image shows s?
    Accuracy on images with s, without s, and their mean (chance 0.5)."""
    with_shape, without_shape = [], []
    for shape, color in pairs:
        rows = labels[:, 1] == COLORS.index(color)
        naming, negated = text_embeddings(clip, tokenizer, [f"a {color} {shape}", f"a {color} shape without any {shape}"])
        prefers_naming = (images[rows] @ naming) > (images[rows] @ negated)
        shows = labels[rows, 0] == SHAPES.index(shape)
        with_shape.append(prefers_naming[shows])
        without_shape.append(~prefers_naming[~shows])
    hits_with, hits_without = torch.cat(with_shape).float().mean(), torch.cat(without_shape).float().mean()
    return {"with_shape": float(hits_with), "without_shape": float(hits_without),
            "balanced": float((hits_with + hits_without) / 2)}


def measure(clip: CLIPModel, tokenizer, data: dict[str, torch.Tensor], held_out_from: int) -> dict:
    """Zero-shot and negation-retrieval accuracies on the held-out renders and reconstructions."""
    labels = data["labels"][held_out_from:]
    seen_pairs = tuple((s, c) for s in SHAPES for c in COLORS if (s, c) not in HELD_OUT_PAIRS)
    report = {}
    for source, key in (("renders", "renders"), ("vae_reconstructions", "reconstructions")):
        images = image_embeddings(clip, data[key][held_out_from:])
        report[source] = {"zero_shot": zero_shot(clip, tokenizer, images, labels),
                          "negation_held_out_pairs": negation_retrieval(clip, tokenizer, images, labels),
                          "negation_seen_pairs": negation_retrieval(clip, tokenizer, images, labels, seen_pairs)}
    return report


# ----- the stage -------------------------------------------------------------------------------------
def train_clip(output: Path, work: Path, budget: ClipBudget, data: dict[str, torch.Tensor], seed: int = 0) -> dict:
    """Train (resuming from ``work/clip/last.ckpt``), measure and write ``output/clip``; returns the record."""
    start = time.time()
    tokenizer = shipped_or_new_tokenizer()
    held_out_from = int(0.9 * len(data["labels"]))
    train = ClassifierData(data["renders"][:held_out_from], data["reconstructions"][:held_out_from],
                           data["labels"][:held_out_from])
    L.seed_everything(seed)
    module = ContrastiveTraining(tokenizer, budget.steps, budget.lr, seed)
    fit(module, DataLoader(train, batch_size=budget.batch, shuffle=True, drop_last=True), budget.steps,
        work / "clip", budget.checkpoint_every)
    clip = module.clip.eval()
    record = {"budget": asdict(budget), "seed": seed, "seconds": round(time.time() - start, 1),
              "parameters": {"text": sum(p.numel() for p in clip.text_model.parameters()),
                             "vision": sum(p.numel() for p in clip.vision_model.parameters())},
              "held_out": measure(clip, tokenizer, data, held_out_from)}
    with atomic_directory(output / CLIP_FOLDER) as folder:
        clip.save_pretrained(folder, safe_serialization=True)
        CLIPProcessor(image_processor=image_processor(), tokenizer=tokenizer).save_pretrained(folder)
        atomic_write_text(folder / "training.json", json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m erasure.toyworld.clip", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("checkpoints/toyworld"), help="the clip folder goes here")
    parser.add_argument("--init", type=Path, default=Path("checkpoints/toyworld"),
                        help="the model folder whose VAE renders the reconstructions")
    parser.add_argument("--work", type=Path, default=None, help="stage checkpoints (default: runs/pretrain-v3[-quick])")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny budget: proves the script works, not quality")
    args = parser.parse_args(argv)
    budget = QUICK_CLIP if args.quick else ClipBudget()
    budget = replace(budget, steps=args.steps) if args.steps else budget
    work = args.work or Path("runs/pretrain-v3" + ("-quick" if args.quick else ""))
    work.mkdir(parents=True, exist_ok=True)
    data_budget = QUICK if args.quick else Budget()
    vae = stage_vae(data_budget, work, args.seed, resolve_path(args.init))
    record = train_clip(args.output, work, budget, stage_dataset(data_budget, work, args.seed, vae), args.seed)
    print(json.dumps(record["held_out"], indent=2))
    print(f"[clip] wrote {args.output / CLIP_FOLDER} in {record['seconds']} s")


if __name__ == "__main__":
    main()

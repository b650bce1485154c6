"""The comparison's analyses of the seed study ("Why Instruction-Based Unlearning Fails in Diffusion
Models?"): how close each instruction template's rewrite stays to the plain prompt in the text
encoder, how much cross-attention each model still puts on the concept's tokens, token ablation and
image-text similarity (:mod:`evaluation.analysis.probes`), whether CLIP reads the instruction (the toy
world's renders), and the image grid of every method on the same prompts and seeds.
``python -m erasure.compare`` runs them."""

from __future__ import annotations

import logging
from pathlib import Path

from erasure.bundle import load_pipeline
from erasure.config import load_config, resolve_path
from erasure.generation import Sampler, generate
from erasure.methods.instruction import NEGATIVE_PROMPT, rewrite
from evaluation import comparison
from evaluation.analysis.attention import attention_curve, concept_positions
from evaluation.analysis.probes import generator_probe, instruction_retrieval
from evaluation.analysis.text import template_similarities
from evaluation.protocols import build_evaluator, build_scorer, get_protocol
from evaluation.report import image_grid
from evaluation.suites import load_csv, write_table

log = logging.getLogger(__name__)


def analyse(runs: list[tuple], output: Path, sampler: Sampler, grid_prompts: int) -> dict:
    """Text similarity, attention curves (UNet models: their attn2 layers) and the image grid; returns what
    the report shows."""
    first = runs[0][1]
    config = first.config
    word = get_protocol(config.protocol).concept_word
    base = load_pipeline(resolve_path(config.model.path))
    suites = {suite: load_csv(first.path / "prompts" / f"{suite}.csv") for suite in ("target", "retained", "incidental")
              if (first.path / "prompts" / f"{suite}.csv").is_file()}
    instruction = next((r.config.method for _, r, _ in runs if r.config.method.name == "instruction"), None)
    templates = dict(instruction.templates) if instruction else load_config(["recipe=instruction"]).method.templates
    similarity_rows, attention_rows, auc_rows, probe_rows, retrieval_rows, charts, skipped = [], [], [], [], [], {}, []
    judge = build_evaluator(config.evaluation, resolve_path)
    clip = build_scorer(config.evaluation, judge, resolve_path)
    erased = {label: run.module.pipeline for label, run, _ in runs if run.module.edits_weights}

    def skip(reason: str) -> None:  # an analysis left out: said on the console and in the report
        log.info(reason)
        skipped.append(reason)

    cross_attention = hasattr(base, "unet")
    if not cross_attention:
        skip("Not measured: this model has no cross-attention (FLUX reads text and image in one joint attention)")
    for concept in config.concept:
        # the analyses follow the concept's tokens: prompts that do not spell it (e.g. "nudity") are left out
        rows = [r for r in suites["target"]
                if r.concept == concept and concept_positions(base.tokenizer, r.prompt, word(concept))]
        if not rows:
            skip(f"no target prompt spells '{concept}': no text or attention analysis for it")
            continue
        prompts, seeds = [r.prompt for r in rows], [r.evaluation_seed for r in rows]
        for name, values in template_similarities(base, prompts, concept, templates).items():
            rounded = {k: round(v, 4) for k, v in values.items()}
            similarity_rows.append({"concept": concept, "template": name, **rounded})
        if judge is not None and cross_attention:
            probe_suites = {"naming": (prompts, seeds)}
            incidental = [r for r in suites.get("incidental", []) if r.concept == concept]
            if incidental:
                probe_suites["incidental"] = ([r.prompt for r in incidental], [r.evaluation_seed for r in incidental])
            probe_rows += [{"concept": concept, **row} for row in
                           generator_probe(base, judge, clip, probe_suites, concept, word(concept), templates, sampler,
                                           erased)]
        if clip is not None and config.protocol == "toyworld":
            retrieval_rows += [{"concept": concept, **row} for row in instruction_retrieval(clip, concept, templates)]
        if not cross_attention:
            continue
        curves = {"plain prompt": attention_curve(base, prompts, seeds, sampler, concept)}
        for name, template in templates.items():
            if name == NEGATIVE_PROMPT:
                negatives = [rewrite(template, "", concept)] * len(prompts)
                curves[f"base + {name}"] = attention_curve(base, prompts, seeds, sampler, concept, negatives)
            else:
                sent = [rewrite(template, p, concept) for p in prompts]
                curves[f"base + {name}"] = attention_curve(base, sent, seeds, sampler, concept)
        for label, run, _ in runs:
            if run.module.edits_weights:
                curves[f"{label} (erased)"] = attention_curve(run.module.pipeline, prompts, seeds, sampler, concept)
        for label, curve in curves.items():
            for layer, values in {"mean": curve.mean, **curve.per_layer}.items():
                attention_rows.extend({"concept": concept, "curve": label, "layer": layer, "step": s + 1,
                                       "mass": round(float(v), 5)} for s, v in enumerate(values))
        plain = curves["plain prompt"].auc
        for label, curve in curves.items():
            auc_rows.append({"concept": concept, "curve": label, "auc": round(curve.auc, 4),
                             "delta_auc": round(curve.auc - plain, 4)})
        chart = f"attention_{concept.replace(' ', '_')}.png"
        comparison.attention_chart({k: v.mean for k, v in curves.items()}, output / chart,
                                   f"cross-attention mass on '{concept}' tokens (mean over attn2 layers, heads, "
                                   f"positions; {len(prompts)} prompts)")
        charts[concept] = chart
    write_table(output / "analysis" / "text_similarity.csv", similarity_rows)
    write_table(output / "analysis" / "attention_curves.csv", attention_rows)
    write_table(output / "analysis" / "attention_auc.csv", auc_rows)
    probe_charts = {}
    for concept in dict.fromkeys(r["concept"] for r in probe_rows):
        probe_charts[concept] = f"probes_{concept.replace(' ', '_')}.png"
        comparison.probe_chart(probe_rows, retrieval_rows, output / probe_charts[concept], concept)
    write_table(output / "analysis" / "token_ablation.csv", probe_rows)
    write_table(output / "analysis" / "instruction_retrieval.csv", retrieval_rows)

    grid = [r for suite in ("target", "retained") for r in suites[suite][:grid_prompts]]
    grid_text, grid_seeds = [r.prompt for r in grid], [r.evaluation_seed for r in grid]
    labels = ["original model", *[label for label, _, _ in runs]]
    images = [generate(base, grid_text, grid_seeds, sampler)]
    images += [run.module.generate(grid_text, grid_seeds, sampler) for _, run, _ in runs]
    image_grid(labels, [list(row) for row in images], output / "grid.png", headers=grid_text)
    if judge is None:
        skip("Not measured: token ablation needs a judge (evaluation.evaluator)")
    if not retrieval_rows:
        skip("Not measured: instruction retrieval needs the toy world and a CLIP (evaluation.clip.checkpoint)")
    return {"similarity": similarity_rows, "auc": auc_rows, "probes": probe_rows, "retrieval": retrieval_rows,
            "charts": charts, "probe_charts": probe_charts, "skipped": skipped}

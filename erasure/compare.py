"""Compare erasure methods on the same prompts, seeds and sampler.

    python -m erasure.compare recipes=[instruction,esd,ablation,uce,lora] concept=circle
    python -m erasure.compare recipes=[esd,runs/uce/20261122-101500] concept=circle trainer.max_steps=300

Each entry of ``recipes`` is a recipe name (run now, into <output_dir>/runs/<name>) or a finished
run directory (reused). ``instruction`` runs once per template in ``templates``. Every other
key=value is passed to every recipe. A comparison directory whose runs finished is reused, so an
interrupted comparison continues where it stopped. The runs are trained here one after another,
or through ``launcher.*`` (``erasure.launch``: local processes, several GPUs, SLURM), e.g.
``launcher.cluster=local launcher.parallel=4 launcher.gpus_per_job=1``.

The comparison directory receives comparison.csv, comparison.md, metrics.png (bar chart),
grid.png (a row per method, the same prompts and seeds), the seed study's analyses (text-encoder
similarity, cross-attention mass on the concept tokens: analysis/*.csv, attention_<concept>.png)
and report.md.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from erasure.bundle import load_pipeline
from erasure.cli import run_command
from erasure.config import (
    ConfigError, available_recipes, check_numbers, load_config, load_run_config, merge_into_schema, parse_overrides,
    resolve_path,
)
from erasure.generation import Sampler, generate
from erasure.io import atomic_write_text
from erasure.methods.instruction import NEGATIVE_PROMPT, rewrite
from erasure.launch import LaunchConfig, check_launcher, launch, train_command
from erasure.runs import Run, TrainingStopped, attack_run, load_run, train
from evaluation import comparison
from evaluation.analysis.attention import attention_curve, concept_positions
from evaluation.analysis.text import template_similarities
from evaluation.attacks import ATTACKS, AttackConfig, budget
from evaluation.metrics import INTERVAL
from evaluation.protocols import get_protocol
from evaluation.report import image_grid
from evaluation.suites import load_csv, write_table

COMPARE_KEYS = {"recipes", "templates", "output_dir", "overwrite", "grid_prompts", "attacks", "attack", "launcher"}
# what must agree between entries for their numbers to be comparable
PROTOCOL_KEYS = ("seed", "protocol", "model.path", "model.resolution", "evaluation.evaluator", "evaluation.steps",
                 "evaluation.guidance", "evaluation.images_per_prompt", "evaluation.target_csv",
                 "evaluation.synonym_csv", "evaluation.retained_csv", "evaluation.fidelity_csv",
                 "evaluation.incidental", "evaluation.incidental_csv",
                 "evaluation.prompts_csv", "evaluation.classes", "evaluation.prompt_template",
                 "evaluation.toyworld", "evaluation.clip", "evaluation.nudenet", "evaluation.torchvision")


@dataclass
class CompareOptions:
    recipes: list[str] = field(default_factory=list)  # recipe names or run directories
    templates: list[str] | None = None  # instruction templates (default: all of the recipe's)
    output_dir: str | None = None
    overwrite: bool = False
    grid_prompts: int = 4
    attacks: list[str] = field(default_factory=list)
    attack: AttackConfig = field(default_factory=AttackConfig)
    launcher: LaunchConfig = field(default_factory=LaunchConfig)  # how the entries' runs are trained (erasure.launch)


@dataclass
class Entry:
    label: str
    config: DictConfig
    arguments: list[str] | None = None  # the train command line of an entry run now (None: a finished run)


def plan(arguments: list[str]) -> tuple[list[Entry], DictConfig, Path]:
    """Validate everything before anything runs: (entries, compare options, output dir)."""
    overrides = parse_overrides(arguments)
    options = merge_into_schema(OmegaConf.structured(CompareOptions),
                                {key: overrides.pop(key) for key in list(overrides) if key in COMPARE_KEYS})
    recipes = options.recipes
    if not recipes:
        raise ConfigError("no recipes given; pass recipes=[instruction,esd,ablation,uce,lora] "
                          "(recipe names or run directories)")
    output = Path(options.get("output_dir") or f"runs/compare/{datetime.now():%Y%m%d-%H%M%S}")
    forwarded = [a for a in arguments if a.split("=", 1)[0].split(".")[0] not in COMPARE_KEYS]
    if any(a.startswith(("output_dir=", "resume=")) for a in forwarded):
        raise ConfigError("output_dir and resume are the comparison's own; pass output_dir=<comparison dir>")
    entries = []
    for item in map(str, recipes):
        if item in available_recipes():
            templates = _templates(item, forwarded, options)
            for template in templates or [None]:
                label = item if template is None else f"{item}-{template}"
                extra = [] if template is None else [f"method.template={template}"]
                arguments = [f"recipe={item}", *forwarded, *extra, f"output_dir={output / 'runs' / label}"]
                entries.append(Entry(label, load_config(arguments), arguments))
        elif Path(item).is_dir():
            entries.append(Entry(Path(item).name, load_run_config(Path(item))))
            entries[-1].config.output_dir = item
        else:
            raise ConfigError(f"'{item}' in recipes is neither a recipe ({', '.join(available_recipes())}) "
                              "nor a run directory")
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two entries share the name {sorted(x for x in labels if labels.count(x) > 1)[0]}; "
                          "rename a run directory")
    concepts = {tuple(e.config.concept) for e in entries}
    if len(concepts) > 1:
        raise ConfigError(f"the entries erase different concepts {sorted(concepts)}; compare runs of one concept set")
    check_protocol(entries)
    check_numbers({"grid_prompts": options.grid_prompts})
    attack_settings(options)
    check_launcher(OmegaConf.to_object(options.launcher))
    return entries, options, output


def check_protocol(entries: list[Entry]) -> None:
    """Refuse entries whose evaluation differs (a reused run made with other settings)."""
    first = entries[0]
    for entry in entries[1:]:
        for key in PROTOCOL_KEYS:
            mine, theirs = OmegaConf.select(entry.config, key), OmegaConf.select(first.config, key)
            if mine != theirs:
                raise ConfigError(f"{entry.label} was evaluated with {key.split('.')[-1]}={mine!r} but {first.label} "
                                  f"with {theirs!r}; re-run it or pass the same {key}")


def _templates(recipe: str, forwarded: list[str], options: DictConfig) -> list[str]:
    """The instruction templates to run (all of the recipe's by default); none for other recipes."""
    config = load_config([f"recipe={recipe}", *forwarded])
    if config.method.name != "instruction":
        return []
    chosen = list(options.get("templates") or config.method.templates)
    unknown = [t for t in chosen if t not in config.method.templates]
    if unknown:
        raise ConfigError(f"unknown template '{unknown[0]}' in templates; known: {', '.join(config.method.templates)}")
    return chosen


def run_entries(entries: list[Entry], launcher: LaunchConfig, output: Path) -> list[tuple[str, Run, Path]]:
    """Train the entries that have not finished (here, or through ``launcher``); every entry's run."""
    todo = []
    for k, entry in enumerate(entries, start=1):
        path = Path(entry.config.output_dir)
        done = (path / "metrics.json").exists()
        print(f"[{k}/{len(entries)}] {entry.label}: {'reusing ' + str(path) if done else 'running'}", flush=True)
        if not done:
            entry.config.overwrite = path.exists()  # a run interrupted before it finished starts again
            todo.append(entry)
    commands = [[*entry.arguments, f"overwrite={entry.config.overwrite}"] for entry in todo]
    if launcher.cluster == "inline":
        codes = []
        for entry, command in zip(todo, commands):
            if entry.config.trainer.devices == 1:
                train(entry.config)
                codes.append(0)
            else:  # Lightning's DDP launcher re-runs the command line: give it the train command's own
                codes.append(train_command(command))
    else:
        codes = launch(commands, launcher, output)
    failed = [entry.label for entry, code in zip(todo, codes) if code != 0]
    if failed:
        logs = "" if launcher.cluster == "inline" else f" and {output / 'launcher'}"
        raise TrainingStopped(f"the runs of {', '.join(failed)} failed; see their folders{logs}")
    return [(entry.label, load_run(entry.config.output_dir), Path(entry.config.output_dir)) for entry in entries]


def analyse(runs: list[tuple[str, Run, Path]], output: Path, sampler: Sampler, grid_prompts: int) -> dict:
    """Text similarity, attention curves (UNet models: their attn2 layers) and the image grid; returns what
    the report shows."""
    first = runs[0][1]
    config = first.config
    word = get_protocol(config.protocol).concept_word
    base = load_pipeline(resolve_path(config.model.path))
    suites = {suite: load_csv(first.path / "prompts" / f"{suite}.csv") for suite in ("target", "retained")}
    instruction = next((r.config.method for _, r, _ in runs if r.config.method.name == "instruction"), None)
    templates = dict(instruction.templates) if instruction else load_config(["recipe=instruction"]).method.templates
    similarity_rows, attention_rows, auc_rows, charts, skipped = [], [], [], {}, []

    def skip(reason: str) -> None:  # an analysis left out: said on the console and in the report
        print(reason, flush=True)
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

    grid = [r for suite in ("target", "retained") for r in suites[suite][:grid_prompts]]
    grid_text, grid_seeds = [r.prompt for r in grid], [r.evaluation_seed for r in grid]
    labels = ["original model", *[label for label, _, _ in runs]]
    images = [generate(base, grid_text, grid_seeds, sampler)]
    images += [run.module.generate(grid_text, grid_seeds, sampler) for _, run, _ in runs]
    image_grid(labels, [list(row) for row in images], output / "grid.png", headers=grid_text)
    return {"similarity": similarity_rows, "auc": auc_rows, "charts": charts, "skipped": skipped}


def attack_settings(options: DictConfig) -> tuple[list[str], AttackConfig]:
    attacks = [str(a) for a in options.get("attacks") or []]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ConfigError(f"unknown attack '{unknown[0]}' in attacks; choose from {', '.join(ATTACKS)}")
    config = OmegaConf.to_object(options.attack)
    check_numbers(asdict(config), "attack.")
    return attacks, config


def add_attacks(rows: list[dict], runs: list[tuple[str, Run, Path]], options: DictConfig) -> None:
    """The robustness columns: each attack's success rate on each run (``evaluation.attacks``)."""
    attacks, config = attack_settings(options)
    for k, (label, _, path) in enumerate(runs, start=1):
        print(f"attacking [{k}/{len(runs)}] {label}: {', '.join(attacks)}", flush=True)
        results = attack_run(path, attacks, config)
        row = next(r for r in rows if r["method"] == label)
        for a in attacks:
            row[f"robustness/{a}_asr"] = results[a]["attack_success_rate"]
            row[f"robustness/{a}_asr{INTERVAL}"] = results[a]["attack_success_rate_ci95"]
            if "pre_attack_success_rate" in results[a]:  # the searches that keep any check's find: the share before
                row[f"robustness/{a}_pre_asr"] = results[a]["pre_attack_success_rate"]
            if "random_control_success_rate" in results[a]:  # a search's random control at its budget
                row[f"robustness/{a}_random_asr"] = results[a]["random_control_success_rate"]
                row[f"robustness/{a}_random_asr{INTERVAL}"] = results[a]["random_control_success_rate_ci95"]


def write_report(output: Path, rows: list[dict], protocol: dict, analysis: dict, runs, attack_budget: str = "") -> None:
    columns = comparison.table_columns(rows)
    write_table(output / "comparison.csv", rows)
    table = comparison.metrics_table(rows, columns)
    atomic_write_text(output / "comparison.md", table + "\n")
    comparison.metrics_chart(rows[1:], output / "metrics.png")
    if attack_budget:
        comparison.robustness_chart(rows[1:], output / "robustness.png")
    text_columns = ["concept", "template", "pooled", "concept_token", "delta_pooled", "delta_concept_token"]
    lines = [
        f"# Comparison: erasing {', '.join(runs[0][1].config.concept)}", "",
        "Every method is scored by the same evaluation callback on the same prompt suites, seeds and sampler.", "",
        "## Protocol", "", *[f"- {key}: {value}" for key, value in protocol.items()],
        *[f"- {label}: `{path}`" for label, _, path in runs], "",
        "## Metrics", "", "After erasure (the original model's row: before). Accuracies are shares of images in which "
        "the evaluator sees the concept, with 95% Wilson intervals; target and synonym lower is better, retained "
        "higher is better; ≈ marks a method whose interval overlaps the best method's (no difference at this number "
        "of images). KID between the original and the erased model's retained images (same prompts and seeds).", "",
        table, "",
        "![metrics](metrics.png)", "",
        *(["Robustness: `robustness/<attack>_asr` is the attack success rate, the share of the attacked target "
            "prompts' images in which the evaluator sees the concept again (`evaluation.attacks`; budget: "
            f"{attack_budget}). `<attack>_pre_asr` is the share before the attack's search (UnlearnDiffAtk's pre-attack "
            "success; the attacks that count the concept at any checkpoint of their search, unlearndiffatk, pez and "
            "embedding, never fall below it). `<attack>_random_asr` is a search's random control: as many judged images "
            "from random prefixes or prompts, so the difference is what the search adds over trying.", "", "![robustness against fidelity](robustness.png)", ""] if attack_budget else []),
        "## Text-encoder similarity (instruction templates)", "",
        "Cosine similarity between the plain prompt and its rewrite: pooled = the text encoder's pooled output "
        "(end token); concept_token = the hidden state of the concept's token in the plain prompt vs every "
        "occurrence of the concept in the rewrite; delta = template minus the repetition control (the concept "
        "repeated, no instruction). `negative_prompt` leaves the conditional text unchanged and has no entry.", "",
        comparison.markdown_table(analysis["similarity"], text_columns), "",
        "## Cross-attention mass on the concept tokens", "",
        *(["Softmax attention of every `attn2` layer on the concept's token positions (all occurrences in the "
           "prompt the model receives), averaged over heads and spatial positions, conditional branch, per DDIM "
           "step; AUC over the normalised step axis; delta = AUC minus the plain prompt's on the base model.", "",
           comparison.markdown_table(analysis["auc"], ["concept", "curve", "auc", "delta_auc"]), "",
           *[f"![attention {c}]({chart})" for c, chart in analysis["charts"].items()], ""] if analysis["auc"] else []),
        *[f"- {reason}" for reason in analysis["skipped"]], "",
        "## Samples", "", "Rows: methods; columns: prompts (target then retained), one seed each.", "",
        "![grid](grid.png)", "",
    ]
    atomic_write_text(output / "report.md", "\n".join(lines))


def compare(arguments: list[str]) -> Path:
    entries, options, output = plan(arguments)
    if output.exists() and any(output.iterdir()) and not options.get("overwrite") and not (output / "runs").is_dir():
        raise ConfigError(f"output_dir {output} exists and is not a comparison; pass another output_dir")
    runs = run_entries(entries, OmegaConf.to_object(options.launcher), output)
    protocol = runs[0][1].metrics["protocol"]
    evaluation = runs[0][1].config.evaluation
    sampler = Sampler(steps=evaluation.steps, guidance=evaluation.guidance)
    print("analysing: text similarity, cross-attention, grid", flush=True)
    analysis = analyse(runs, output, sampler, options.grid_prompts)
    rows = comparison.metric_rows([(label, run.metrics) for label, run, _ in runs])
    if options.get("attacks"):
        add_attacks(rows, runs, options)
    attacks, attack_config = attack_settings(options)
    budgets = "; ".join(f"{a}: " + ", ".join(f"{k} {v}" for k, v in budget(a, attack_config).items()) for a in attacks)
    write_report(output, rows, protocol, analysis, runs, budgets)
    print(f"comparison of {len(runs)} runs -> {output / 'report.md'}")
    return output


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__, compare, argv, {TrainingStopped: (1, "error")})


if __name__ == "__main__":
    sys.exit(main())

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
similarity, cross-attention mass on the concept tokens: analysis/*.csv, attention_<concept>.png;
``evaluation.analysis.seed_study``) and report.md (``evaluation.comparison``).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from erasure.cli import run_command
from erasure.config import (
    ConfigError, available_recipes, check_numbers, load_config, load_run_config, merge_into_schema, parse_overrides,
)
from erasure.generation import Sampler
from erasure.launch import LaunchConfig, check_launcher, launch, train_command
from erasure.runs import Run, TrainingStopped, attack_run, load_run, train
from evaluation import comparison
from evaluation.analysis.seed_study import analyse
from evaluation.attacks import ATTACKS, AttackConfig, budget
from evaluation.metrics import INTERVAL

log = logging.getLogger(__name__)
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
    """The instruction templates to run (all of the recipe's by default); none for methods without templates."""
    config = load_config([f"recipe={recipe}", *forwarded])
    if "templates" not in config.method:
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
        log.info(f"[{k}/{len(entries)}] {entry.label}: {'reusing ' + str(path) if done else 'running'}")
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
        log.info(f"attacking [{k}/{len(runs)}] {label}: {', '.join(attacks)}")
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


def compare(arguments: list[str]) -> Path:
    entries, options, output = plan(arguments)
    if output.exists() and any(output.iterdir()) and not options.get("overwrite") and not (output / "runs").is_dir():
        raise ConfigError(f"output_dir {output} exists and is not a comparison; pass another output_dir")
    runs = run_entries(entries, OmegaConf.to_object(options.launcher), output)
    protocol = runs[0][1].metrics["protocol"]
    evaluation = runs[0][1].config.evaluation
    sampler = Sampler(steps=evaluation.steps, guidance=evaluation.guidance)
    log.info("analysing: text similarity, cross-attention, grid")
    analysis = analyse(runs, output, sampler, options.grid_prompts)
    rows = comparison.metric_rows([(label, run.metrics) for label, run, _ in runs])
    if options.get("attacks"):
        add_attacks(rows, runs, options)
    attacks, attack_config = attack_settings(options)
    budgets = "; ".join(f"{a}: " + ", ".join(f"{k} {v}" for k, v in budget(a, attack_config).items()) for a in attacks)
    comparison.write_report(output, rows, protocol, analysis, runs, budgets)
    log.info(f"comparison of {len(runs)} runs -> {output / 'report.md'}")
    return output


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__, compare, argv, {TrainingStopped: (1, "error")})


if __name__ == "__main__":
    sys.exit(main())

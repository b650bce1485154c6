"""Run configuration: layers of YAML and ``key=value`` overrides, validated against typed schemas.

Layers, lowest first (a later layer wins):

    method defaults + recipes/base.yaml   "default"
    recipes/models/<preset>.yaml          "model preset <name>": a model family's published values
                                          (``model.preset=auto`` detects it from the model folder)
    the protocol's layer                  "protocol <name>": evaluator, sampler, suites' settings, the
                                          method's settings for the protocol's concept kind and the
                                          values of the roles the method needs (``evaluation.protocols``)
    recipes/<recipe>.yaml                 "recipe <name>" (``inherit: <recipe>``: another recipe's keys
                                          below its own, and that recipe's preset section)
    the command line                      "command line"

Presets hold a section per recipe name; protocols name no method (``EraserModule.needs``). The
top level is checked against :class:`RunConfig`, the ``method`` section against the chosen method's ``Config`` dataclass, so
an unknown key, a value of the wrong type or an invalid choice is a :class:`ConfigError` with a
one-line message naming it and the valid choices. ``sources`` in the resolved config names the
layer each value came from.

Recipes and presets are looked up by :func:`erasure.bundle.resolve_path`: a ``recipes/<name>.yaml``
(or ``recipes/models/<preset>.yaml``) in the working directory comes before the shipped one of the
same name (the repository's in a checkout, the installed package's otherwise), and adds to the names
available; so do relative paths such as ``model.path``. Plug-in packages add recipes after both
(:mod:`erasure.plugins`).
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from erasure.bundle import SHIPPED_MODELS, SHIPPED_ROOT, is_hub_id, resolve_path
from erasure.loggers import PACKAGES as LOGGER_PACKAGES
from erasure.plugins import recipe_folders
from evaluation.evaluators import CLIPConfig, NudeNetConfig, TorchvisionConfig
from evaluation.protocols import DEFAULT_PROTOCOL, PROTOCOLS, ProtocolError, get_protocol
from evaluation.protocols.no_benchmark import NoBenchmark
from evaluation.protocols.toyworld import ToyWorldEvaluatorConfig

RECIPES_DIR = Path("recipes")  # relative: resolved against the working directory, then the shipped data
PRESETS_DIR = RECIPES_DIR / "models"
BASE_RECIPE = "base"
AUTO, NO_PRESET = "auto", "none"
NO_BENCHMARK = NoBenchmark.name
# model presets by the width of the UNet's cross-attention context (the text encoder's width)
PRESET_BY_CONTEXT_WIDTH = {128: "toyworld", 768: "sd15", 1024: "sd21"}
# FLUX-format models by the width of the transformer's text stream (T5's width)
PRESET_BY_JOINT_WIDTH = {128: "toyworld-flux"}


class ConfigError(ValueError):
    """A bad recipe, key or value; the message is one line naming the problem and the fix."""


@dataclass
class ModelConfig:
    path: str = "checkpoints/toyworld/sd"  # or model=<name> for a shipped model (toyworld, toyworld-flux)
    preset: str = AUTO
    resolution: int | None = None
    gradient_checkpointing: bool = False  # recompute the denoiser's blocks in backward (real sizes: less memory)


@dataclass
class TrainerConfig:
    max_steps: int = 200
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 50
    logger: str = "csv"  # csv | tensorboard | wandb | mlflow (erasure.loggers)
    num_nodes: int = 1  # machines of a multi-node run (Lightning's launcher or SLURM starts one process per device)
    step_in_backward: bool = True  # each tensor's optimizer update as its gradient completes (erasure.runs.StepInBackward)


@dataclass
class EvaluationConfig:
    enabled: bool = True
    evaluator: str = "none"  # toyworld | clip | nudenet | torchvision | none (evaluation.protocols)
    toyworld: ToyWorldEvaluatorConfig = field(default_factory=ToyWorldEvaluatorConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    nudenet: NudeNetConfig = field(default_factory=NudeNetConfig)
    torchvision: TorchvisionConfig = field(default_factory=TorchvisionConfig)
    steps: int = 25
    guidance: float = 6.0
    images_per_prompt: int = 3
    target_csv: str | None = None
    synonym_csv: str | None = None
    retained_csv: str | None = None
    fidelity_csv: str | None = None
    incidental_csv: str | None = None  # prompts that do not name the concept but may produce it
    incidental: bool = False  # protocol toyworld: generate the incidental suite ("a red shape" for circle)
    compounds: int = 10  # protocol mass: how many compounds are drawn when no concept is named
    compound_seed: int = 0  # protocol mass: the draw's seed
    concepts: int = 10  # protocol mass-csv: how many of the file's concepts are drawn when no concept is named
    concept_seed: int = 0  # protocol mass-csv: the draw's seed
    prompts_csv: str | None = None  # protocol artists: every artist's prompts
    classes: list[str] = field(default_factory=list)  # protocol objects: the classes
    prompt_template: str = "{concept}"  # protocol objects: the prompt of a class
    paraphrase_templates: list[str] = field(default_factory=list)  # protocol objects: the synonym suite
    options: dict[str, Any] = field(default_factory=dict)  # a plug-in evaluator's settings (erasure.plugins)
    every_n_steps: int = 0
    batch_size: int = 64
    kid_subset_size: int = 50


@dataclass
class RunConfig:
    recipe: str = "???"
    protocol: str | None = None
    concept: Any = None
    seed: int = 0
    output_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    method: Any = None
    sources: dict[str, str] = field(default_factory=dict)  # resolved key -> the layer it came from


def yaml_names(folder: Path) -> list[str]:
    """The names of the YAML files in ``folder`` of the working directory and of the shipped data."""
    return sorted({p.stem for root in (Path.cwd(), SHIPPED_ROOT) for p in (root / folder).glob("*.yaml")})


def available_recipes() -> list[str]:
    """Recipes of the working directory, the shipped data and the plug-ins (``erasure.plugins``)."""
    plugged = {path.stem for folder in recipe_folders() for path in folder.glob("*.yaml")}
    return sorted({*yaml_names(RECIPES_DIR), *plugged} - {BASE_RECIPE})


def recipe_path(name: str) -> Path:
    """The file of recipe ``name``: the working directory's, the shipped one, else a plug-in's."""
    path = resolve_path(RECIPES_DIR / f"{name}.yaml")
    if path.is_file():
        return path
    return next((folder / f"{name}.yaml" for folder in recipe_folders() if (folder / f"{name}.yaml").is_file()), path)


def _keys_at(schema: DictConfig, full_key: str) -> list[str]:
    node: Any = schema
    for part in full_key.split(".")[:-1]:
        node = node.get(part) if isinstance(node, DictConfig) else None
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def merge_into_schema(schema: DictConfig, *layers: Any, prefix: str = "") -> DictConfig:
    """Merge layers into a structured schema, turning OmegaConf errors into one-line ConfigErrors."""
    try:
        return OmegaConf.merge(schema, *layers)
    except ConfigKeyError as error:
        key = f"{prefix}{error.full_key}"
        valid = ", ".join(_keys_at(schema, str(error.full_key)))
        raise ConfigError(f"unknown key '{key}'; valid keys here: {valid}") from None
    except ValidationError as error:
        key = f"{prefix}{error.full_key}"
        reason = str(error.msg).splitlines()[0]
        raise ConfigError(f"invalid value for '{key}': {reason}") from None
    except (OmegaConfBaseException, TypeError, ValueError) as error:
        given = ", ".join(f"{prefix}{key}" for key in flatten(OmegaConf.to_container(OmegaConf.create(layers[-1]))))
        raise ConfigError(f"invalid configuration: {str(error).splitlines()[0]}; check the values of {given}") from None


def parse_overrides(arguments: list[str]) -> DictConfig:
    """``key=value`` arguments as one config; ``model=<name>`` is ``model.path=`` of a shipped model
    (:data:`~erasure.bundle.SHIPPED_MODELS`) or, for any other value, of that folder or hub id."""
    bad = [a for a in arguments if "=" not in a or a.startswith("=")]
    if bad:
        raise ConfigError(f"argument '{bad[0]}' is not of the form key=value (e.g. concept=star trainer.max_steps=300)")
    layers = []
    for argument in arguments:
        key, _, value = argument.partition("=")
        if key == "model":
            if not value.strip():
                raise ConfigError(f"model= needs a value: one of {', '.join(SHIPPED_MODELS)}, or a model folder")
            argument = f"model.path={SHIPPED_MODELS.get(value, value)}"
        if "${" in argument:
            raise ConfigError(f"'{argument.split('=', 1)[0]}': interpolations (${{...}}) are not taken from the command "
                              "line; write the value literally")
        try:
            layers.append(OmegaConf.from_dotlist([argument]))
        except Exception as error:  # noqa: BLE001 - OmegaConf and its YAML parser raise several kinds: one line
            key = argument.split("=", 1)[0]
            raise ConfigError(f"cannot parse the value of {key!r} in {argument!r} ({str(error).splitlines()[0]}); "
                              "quote text with spaces or brackets, e.g. concept=\"a, b\"") from None
    try:
        return OmegaConf.merge(OmegaConf.create(), *layers)
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot combine the overrides: {str(error).splitlines()[0]}") from None


def normalise_concepts(value: Any) -> list[str]:
    concepts = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not concepts or any(not isinstance(c, str) or not c.strip() for c in concepts):
        raise ConfigError(f"concept must be a non-empty word or list of words, got {value!r}; e.g. concept=circle")
    return [c.strip() for c in concepts]


def available_presets() -> list[str]:
    return yaml_names(PRESETS_DIR)


def load_preset(name: str) -> DictConfig:
    """A model preset's sections (one per recipe); ``inherit: <preset>`` starts from another preset."""
    if name == NO_PRESET:
        return OmegaConf.create()
    if name not in available_presets():
        raise ConfigError(f"unknown model preset '{name}' for model.preset; available: "
                          f"{', '.join([AUTO, *available_presets(), NO_PRESET])}")
    preset = OmegaConf.load(resolve_path(PRESETS_DIR / f"{name}.yaml"))
    parent = preset.pop("inherit", None)
    return OmegaConf.merge(load_preset(parent), preset) if parent else preset


def detect_preset(model_path: str) -> str:
    """The model family of a diffusers folder, from its UNet's cross-attention width or its FLUX
    transformer's text width (``none`` if unknown)."""
    folder = resolve_path(model_path)
    denoiser, key, table = (("transformer", "joint_attention_dim", PRESET_BY_JOINT_WIDTH)
                            if (folder / "transformer").is_dir() else ("unet", "cross_attention_dim", PRESET_BY_CONTEXT_WIDTH))
    try:
        width = json.loads((folder / denoiser / "config.json").read_text()).get(key)
    except (OSError, ValueError):
        return NO_PRESET  # a missing or broken folder is reported when the model loads
    return table.get(width if isinstance(width, int) else None, NO_PRESET)


def choose_protocol(peek: DictConfig) -> tuple[str, str]:
    """(protocol name, how it was chosen)."""
    name = peek.get("protocol")
    if name:
        return str(name), ""
    evaluation = peek.get("evaluation") or {}
    if all(evaluation.get(f"{suite}_csv") for suite in ("target", "synonym", "retained")):
        return "csv", "inferred: target, synonym and retained CSVs given"
    if evaluation.get("enabled") is False and not knows_concepts(get_protocol(DEFAULT_PROTOCOL), peek):
        return NO_BENCHMARK, f"inferred: evaluation.enabled=false and a concept protocol {DEFAULT_PROTOCOL} does not know"
    return DEFAULT_PROTOCOL, "default"


def knows_concepts(protocol, peek: DictConfig) -> bool:
    """Whether ``protocol`` can take the concepts of ``peek`` (evaluated or not)."""
    try:
        evaluation = OmegaConf.merge({"enabled": True}, protocol.defaults.get("evaluation", {}))
        protocol.check(normalise_concepts(peek.get("concept") or protocol.defaults.get("concept")), evaluation)
    except (ProtocolError, ConfigError):
        return False
    return True


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of every leaf (lists and empty dicts are leaves)."""
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def load_recipe(name: str, children: tuple[str, ...] = ()) -> tuple[str, DictConfig]:
    """(the name of the preset section it takes, the recipe's layer); ``inherit: <recipe>``
    starts from another recipe and takes its section (``esd-fast``: ESD's, with another x_t loop)."""
    layer = OmegaConf.load(recipe_path(name))
    parent = layer.pop("inherit", None)
    if parent is None:
        return name, layer
    if parent not in available_recipes() or parent in (*children, name):
        raise ConfigError(f"recipe {name} inherits '{parent}', which is no recipe or inherits {name}; inherit one of: "
                          f"{', '.join(r for r in available_recipes() if r not in (*children, name))}")
    section, parent_layer = load_recipe(parent, (*children, name))
    return section, OmegaConf.merge(parent_layer, layer)


def load_config(arguments: list[str]) -> DictConfig:
    """Resolve ``recipe=<name> key=value ...`` into a validated config (nothing is written)."""
    overrides = parse_overrides(arguments)
    recipe = overrides.pop("recipe", None)
    recipes = available_recipes()
    if recipe is None:
        raise ConfigError(f"no recipe given; pass recipe=<name>, one of: {', '.join(recipes)}")
    if recipe not in recipes:
        raise ConfigError(f"unknown recipe '{recipe}'; available recipes: {', '.join(recipes)}")
    base = OmegaConf.load(resolve_path(RECIPES_DIR / f"{BASE_RECIPE}.yaml"))
    section, recipe_layer = load_recipe(recipe)
    above = OmegaConf.merge(recipe_layer, overrides)
    method = method_class_of(recipe, (base, above))
    try:
        peek = OmegaConf.merge(base, above)
        protocol_name, protocol_how = choose_protocol(peek)
        protocol = get_protocol(protocol_name)
        preset_name = str(peek.model.get("preset") or AUTO)
        preset_how = ""
        if preset_name == AUTO:
            preset_name, preset_how = detect_preset(str(peek.model.path)), f"detected from {peek.model.path}"
        preset_layer = load_preset(preset_name).get(section) or OmegaConf.create()
        protocol_layer = protocol.layer(method, OmegaConf.merge(base, preset_layer), above)
    except ProtocolError as error:
        raise ConfigError(str(error)) from None
    except (OmegaConfBaseException, TypeError, ValueError) as error:
        given = ", ".join(flatten(OmegaConf.to_container(overrides))) or "the recipe's keys"
        raise ConfigError(f"invalid configuration: {str(error).splitlines()[0]}; check the values of {given}") from None
    layers = {"default": base, f"model preset {preset_name}": preset_layer, f"protocol {protocol_name}": protocol_layer,
              f"recipe {recipe}": recipe_layer, "command line": overrides}
    config = build_config(recipe, [OmegaConf.create(layer) for layer in layers.values()])
    config.protocol, config.model.preset = protocol_name, preset_name
    sources = {}
    for name, layer in layers.items():
        sources.update(dict.fromkeys(flatten(OmegaConf.to_container(layer)), name))
    resolved = flatten(OmegaConf.to_container(config))
    config.sources = {key: sources.get(key, "method default" if key.startswith("method.") else "default")
                      for key in resolved if not key.startswith("sources")}
    if protocol_how:
        config.sources["protocol"] = protocol_how
    if preset_how:
        config.sources["model.preset"] = preset_how
    if config.output_dir is None:
        config.output_dir = f"runs/{recipe}/{datetime.now():%Y%m%d-%H%M%S}"
    try:
        protocol.check(list(config.concept), config.evaluation)
        protocol.check_method(method, config.method, list(config.concept))
    except ProtocolError as error:
        raise ConfigError(str(error)) from None
    return config


def method_class_of(recipe: str, layers: Sequence[Any]) -> type:
    """The method class the last layer naming ``method.name`` chooses (the schema merges the rest)."""
    from erasure.methods import METHODS  # methods import torch; keep config parsing importable alone

    sections = [layer.get("method") for layer in layers]
    names = [section["name"] for section in sections if isinstance(section, (dict, DictConfig)) and "name" in section]
    name = names[-1] if names else None
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"unknown method '{name}' in recipe {recipe}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def build_config(recipe: str, layers: list[DictConfig]) -> DictConfig:
    """Merge config layers (later wins) into the typed schemas and check them."""
    method_class = method_class_of(recipe, layers)
    method_layers = [layer.pop("method", None) or {} for layer in layers]
    config = merge_into_schema(OmegaConf.structured(RunConfig), *layers)
    config.recipe = recipe
    method = merge_into_schema(OmegaConf.structured(method_class.Config), *method_layers, prefix="method.")
    for key, allowed in method_class.choices.items():
        if method[key] not in allowed:
            raise ConfigError(f"invalid value for 'method.{key}': {method[key]!r}; choose one of: {', '.join(map(str, allowed))}")
    config.method = method
    try:
        OmegaConf.resolve(config)  # ${...} interpolations: resolved now, or a one-line error
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot resolve an interpolation in the config ({str(error).splitlines()[0]}); "
                          "write values literally") from None
    if config.concept is None:
        raise ConfigError(f"no concept given; pass concept=<concept> (protocol {config.protocol or DEFAULT_PROTOCOL} "
                          "has no default concept)")
    config.concept = normalise_concepts(config.concept)
    if config.protocol is not None and config.protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol '{config.protocol}'; available protocols: {', '.join(PROTOCOLS)}")
    try:
        method_class.check(OmegaConf.to_object(method), list(config.concept))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_values(config)
    return config


def load_run_config(run_dir: Path) -> DictConfig:
    """The validated config of a finished run directory (its ``config.yaml``)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); pass a directory written by erasure.train")
    try:
        saved = OmegaConf.load(path)
    except (OmegaConfBaseException, ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read {path}: {str(error).splitlines()[0]}; re-run the erasure") from None
    if not isinstance(saved, DictConfig):
        raise ConfigError(f"{path} holds no run configuration; re-run the erasure")
    recipe = saved.pop("recipe", None) or "unknown"
    try:
        return build_config(recipe, [saved])
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}; re-run the erasure or restore the file") from None


# ----- values: checked at configuration time against what the libraries underneath accept -----------
MAX_INT, MAX_SEED = 2**31 - 1, 2**32 - 1  # seeds: numpy's and Lightning's range
POSITIVE = {  # keys (the part after "method." for methods) whose values must be > 0
    "trainer.max_steps", "trainer.devices", "trainer.num_nodes", "trainer.log_every_n_steps",
    "trainer.checkpoint_every_n_steps",
    "evaluation.steps", "evaluation.images_per_prompt", "evaluation.batch_size", "model.resolution",
    "method.lr", "method.batch_size", "method.sigma", "method.ddim_steps", "method.rank", "method.alpha",
    "method.num_anchor_images", "method.anchor_steps", "method.lam", "method.max_grad_norm",
    "attack.steps", "attack.lr", "attack.batch_size", "attack.images", "attack.inversion.tokens",
    "attack.soft_prompt.tokens", "grid_prompts",
}
AT_MOST = {"evaluation.steps": 1000, "method.ddim_steps": 1000, "method.anchor_steps": 1000,  # DDIM over 1000 steps
           "method.anchor_eta": 1.0,  # DDIM's eta: 0 (deterministic) to 1 (DDPM-like)
           "evaluation.kid_subset_size": MAX_INT, "evaluation.nudenet.threshold": 1.0}
AT_LEAST = {"evaluation.kid_subset_size": 2}
PRECISIONS_ON_CPU = ("32-true", "32", "bf16-mixed")
PRECISIONS_ON_GPU = (*PRECISIONS_ON_CPU, "16-mixed", "bf16-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true")
TEMPLATES = {"method.prompt_template": ("concept",), "evaluation.prompt_template": ("concept",),
             "evaluation.clip.template": ("concept",), "method.target_template": ("anchor_prompt", "concept")}


def check_number(key: str, value: Any) -> None:
    """Finite floats; integers in range; positive and bounded where the key requires it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"'{key}' must be a finite number, got {value}")
    low = AT_LEAST.get(key, 1 if key in POSITIVE else 0)
    high = AT_MOST.get(key, MAX_SEED if key.endswith("seed") else MAX_INT)
    if isinstance(value, int) and not low <= value <= high:
        raise ConfigError(f"'{key}' must be an integer from {low} to {high}, got {value}")
    if isinstance(value, float) and key in POSITIVE and value <= 0:
        raise ConfigError(f"'{key}' must be positive, got {value}")
    if isinstance(value, float) and key in AT_MOST and not 0 <= value <= high:
        raise ConfigError(f"'{key}' must be from 0 to {high}, got {value}")


def check_numbers(values: dict, prefix: str = "") -> None:
    """:func:`check_number` on every leaf of a (nested) dict, keys prefixed."""
    for key, value in flatten(values, prefix).items():
        for item in value if isinstance(value, list) else [value]:
            check_number(key, item)


def check_template(key: str, template: str, fields: tuple[str, ...]) -> None:
    try:
        template.format(**{name: "x" for name in fields})
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(f"'{key}' is not a valid template ({error!s}); use {{{'}, {'.join(fields)}}} "
                          f"as placeholders, e.g. {key}=\"a photo of {{concept}}\"") from None


def check_path(key: str, value: str | None, kind: str) -> None:
    """A configured file or folder must exist (relative to the working directory or the shipped data)."""
    if not value:
        return
    try:
        path = resolve_path(value)
        found = {"folder": path.is_dir, "file": path.is_file}.get(kind, path.exists)()
    except (OSError, ValueError) as error:
        raise ConfigError(f"'{key}' is not a usable path ({error}); give the path of a {kind}") from None
    if not found:
        raise ConfigError(f"'{key}': no {kind} at {value}; give the path of an existing {kind}")


def check_trainer(trainer: DictConfig) -> None:
    """Accelerator, devices, precision and strategy as Lightning accepts them on this machine."""
    gpus = torch_gpu_count()
    if trainer.accelerator not in ACCELERATORS:
        raise ConfigError(f"invalid value for 'trainer.accelerator': {trainer.accelerator!r}; choose one of: "
                          f"{', '.join(ACCELERATORS)}")
    if trainer.accelerator in ("gpu", "cuda") and not gpus:
        raise ConfigError("trainer.accelerator=gpu but this machine has no GPU; use trainer.accelerator=cpu or auto")
    on_gpu = gpus > 0 and trainer.accelerator != "cpu"
    if on_gpu and trainer.devices > gpus:
        raise ConfigError(f"trainer.devices={trainer.devices} but this machine has {gpus} GPU(s)")
    precisions = PRECISIONS_ON_GPU if on_gpu else PRECISIONS_ON_CPU
    if str(trainer.precision) not in precisions:
        raise ConfigError(f"invalid value for 'trainer.precision': {trainer.precision!r}; choose one of: "
                          f"{', '.join(precisions)}{'' if on_gpu else ' (on a CPU)'}")
    if trainer.strategy not in STRATEGIES:
        raise ConfigError(f"invalid value for 'trainer.strategy': {trainer.strategy!r}; choose one of: "
                          f"{', '.join(STRATEGIES)}")
    if trainer.logger not in LOGGER_PACKAGES:
        raise ConfigError(f"invalid value for 'trainer.logger': {trainer.logger!r}; choose one of: "
                          f"{', '.join(LOGGER_PACKAGES)}")
    package = LOGGER_PACKAGES[trainer.logger]
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"trainer.logger={trainer.logger} needs the {package} package; "
                          f"pip install 'erasure[{trainer.logger}]' or use trainer.logger=csv")


def torch_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_values(config: DictConfig) -> None:
    """Every value against what the code and libraries underneath accept; a one-line ConfigError naming
    the key and the allowed values, before anything is loaded or written."""
    values = flatten(OmegaConf.to_container(config))
    for key, value in values.items():
        if key.startswith("sources."):
            continue
        check_number(key, value)
        if isinstance(value, list):
            for item in value:
                check_number(key, item)
        if key in TEMPLATES and value is not None:
            check_template(key, value, TEMPLATES[key])
    if not is_hub_id(config.model.path):
        check_path("model.path", config.model.path, "folder")
    if config.model.resolution is not None and config.model.resolution % 8:
        raise ConfigError(f"'model.resolution' must be a multiple of 8 pixels, got {config.model.resolution}")
    check_trainer(config.trainer)
    evaluation = config.evaluation
    weights = {"toyworld": ("evaluation.toyworld.classifier", "folder"), "clip": ("evaluation.clip.checkpoint", "file or folder"),
               "torchvision": ("evaluation.torchvision.weights", "file"), "nudenet": ("evaluation.nudenet.model", "file")}
    if evaluation.enabled and evaluation.evaluator in weights:
        key, kind = weights[evaluation.evaluator]
        check_path(key, OmegaConf.select(config, key), kind)

"""Protocols: their suites, defaults and refusals; the config layers they sit in."""

import re
from pathlib import Path

import pytest

from erasure.config import ConfigError, load_config
from erasure.train import main
from evaluation.protocols import PROTOCOLS, get_protocol
from evaluation.protocols.objects import IMAGENETTE


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("arguments, message", [
    (["protocol=imagenet"], "unknown protocol 'imagenet'; available protocols: toyworld, mass, mass-csv, csv, nudity, objects, artists"),
    (["protocol=csv", "concept=cat"], "protocol csv needs evaluation.target_csv=<prompts.csv>"),
    (["protocol=nudity"], "protocol nudity needs evaluation.target_csv=<prompts.csv> (an I2P-format CSV"),
    (["protocol=objects", "concept=cat"], "concept 'cat' is not a class of protocol objects (tench, English springer"),
    (["protocol=objects"], "no concept given; pass concept=<concept> (protocol objects has no default concept)"),
    (["protocol=artists", "concept=Monet"], "protocol artists needs evaluation.prompts_csv=<prompts.csv>"),
    (["concept=cat"], "concept 'cat' is not in the toy world (its concepts: circle, square"),
    (["protocol=csv", "concept=cat", "evaluation.target_csv=/nonexistent.csv"], "evaluation.target_csv: no file at /nonexistent.csv"),
    (["model.preset=sdxl9"], "unknown model preset 'sdxl9' for model.preset; available: auto, sd14, sd15, sd21, toyworld, toyworld-flux, none"),
])
def test_protocol_errors_are_one_line_exit_2(tmp_path, capsys, arguments, message):
    assert main(["recipe=esd", *arguments, f"output_dir={tmp_path / 'run'}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "run").exists()


def test_artist_not_in_the_file_is_refused(tmp_path):
    artists = write(tmp_path / "a.csv", "case_number,prompt,evaluation_seed,artist\n0,a night sky,1,Van Gogh\n")
    with pytest.raises(ConfigError, match="concept 'Monet' is not an artist in .* \\(Van Gogh\\)"):
        load_config(["recipe=uce", "protocol=artists", "concept=Monet", f"evaluation.prompts_csv={artists}"])


def test_three_csvs_infer_the_csv_protocol_and_layers_are_recorded(tmp_path):
    cat = write(tmp_path / "cat.csv", "case_number,prompt,evaluation_seed,concept\n0,a cat,1,cat\n")
    config = load_config(["recipe=uce", "concept=cat", *(f"evaluation.{s}_csv={cat}" for s in ("target", "synonym", "retained"))])
    assert config.protocol == "csv" and config.sources["protocol"].startswith("inferred")
    assert config.evaluation.evaluator == "none" and config.sources["evaluation.evaluator"] == "protocol csv"
    only_target = load_config(["recipe=uce", f"evaluation.target_csv={cat}"])  # a toy concept with one CSV: toy world
    assert only_target.protocol == "toyworld"


def test_precedence_is_default_preset_protocol_recipe_command_line():
    config = load_config(["recipe=uce"])
    assert config.sources["method.lam"] == "method default"
    assert config.sources["method.token_mode"] == "model preset toyworld"
    assert config.sources["method.guide"] == "protocol toyworld"
    assert config.sources["method.edit"] == "recipe uce"
    time = load_config(["recipe=time"])  # the recipe wins over the protocol's UCE values
    assert time.method.lam == 0.1 and list(time.method.preserve) == [] and time.sources["method.lam"] == "recipe time"
    override = load_config(["recipe=uce", "method.guide=[a square]"])
    assert list(override.method.guide) == ["a square"] and override.sources["method.guide"] == "command line"
    anchor = load_config(["recipe=ablation", "method.anchor=triangle"])  # derived defaults follow the final anchor
    assert all("triangle" in p for p in anchor.method.anchor_prompts)


def test_objects_suites_use_the_template_and_the_other_classes():
    config = load_config(["recipe=esd", "protocol=objects", "concept=parachute", "evaluation.evaluator=none"])
    suites = get_protocol("objects").suites(["parachute"], config.evaluation, seed=0)
    assert [r.prompt for r in suites["target"]] == ["Image of parachute"]
    assert {r.concept for r in suites["retained"]} == set(IMAGENETTE) - {"parachute"}
    assert config.evaluation.images_per_prompt == 500 and config.method.train_method == "esd-u"


def test_nudity_reads_i2p_files_and_labels_every_row(tmp_path):
    i2p = write(tmp_path / "i2p.csv", "prompt,categories,sd_seed,sd_guidance_scale,case_number\n"
                                      "a bather,sexual,42,7,3\nan orgy of colors,sexual,7,7,4\n")
    config = load_config(["recipe=uce", "protocol=nudity", f"evaluation.target_csv={i2p}"])
    suites = get_protocol("nudity").suites(["nudity"], config.evaluation, seed=0)
    assert [(r.case_number, r.evaluation_seed, r.concept) for r in suites["target"]] == [(3, 42, "nudity"), (4, 7, "nudity")]
    assert config.evaluation.nudenet.threshold == 0.6 and config.evaluation.guidance == 7.5


def test_every_protocol_is_documented_on_the_protocols_page():
    page = (Path(__file__).resolve().parents[3] / "docs" / "protocols.md").read_text()
    for name in PROTOCOLS:
        assert f"protocol={name}" in page


@pytest.mark.parametrize("concepts", [["circle"], ["red"], ["striped"], ["circle", "red"]])
def test_toyworld_incidental_suite_never_names_the_concept_and_only_when_asked(concepts):
    from erasure.toyworld.world import ATTRIBUTES, SYNONYMS, WORDS, attribute_of

    protocol = get_protocol("toyworld")
    plain = protocol.suites(concepts, load_config(["recipe=esd"]).evaluation, seed=0)
    assert "incidental" not in plain
    suites = protocol.suites(concepts, load_config(["recipe=esd", "evaluation.incidental=true"]).evaluation, seed=0)
    assert {k: suites[k] for k in plain} == plain  # the other suites, seeds included, are unchanged
    rows = suites["incidental"]
    assert {r.concept for r in rows} == set(concepts) and all(sum(r.concept == c for r in rows) >= 25 for c in concepts)
    for row in rows:
        words = set(row.prompt.split())
        erased_words = {WORDS[c] for c in concepts} | {s for c in concepts for s in SYNONYMS[c]}
        assert not words & erased_words, row.prompt
        # no value of the concept's attribute is named: the prompt leaves it to chance
        same_attribute = {WORDS[v] for v in ATTRIBUTES[attribute_of(row.concept)]}
        assert not words & same_attribute, row.prompt


def test_incidental_csv_is_read_and_checked(tmp_path):
    csv = write(tmp_path / "incidental.csv", "case_number,prompt,evaluation_seed,concept\n0,a red shape,3,circle\n")
    config = load_config(["recipe=esd", f"evaluation.incidental_csv={csv}"])
    suites = get_protocol("toyworld").suites(["circle"], config.evaluation, seed=0)
    assert [(r.prompt, r.evaluation_seed, r.concept) for r in suites["incidental"]] == [("a red shape", 3, "circle")]
    with pytest.raises(ConfigError, match="evaluation.incidental_csv: no file at /nowhere.csv"):
        load_config(["recipe=esd", "evaluation.incidental_csv=/nowhere.csv"])


def test_toy_uce_guides_each_concept_to_another_concept_of_its_attribute():
    assert list(load_config(["recipe=uce"]).method.guide) == ["a square"]  # circle, the default concept
    several = load_config(["recipe=rece", "concept=[square,circle,red]"])
    assert list(several.method.guide) == ["a triangle", "a triangle", "a orange"]
    assert list(load_config(["recipe=time"]).method.guide) == ["a square"]  # TIME keeps its destination prompt


@pytest.mark.parametrize("protocol, concept, expected", [
    ("nudity", "nudity", {"epochs": 3, "adversarial_lam": 0.1, "reedit_preserve": [" "], "keep": "lowest"}),
    ("objects", "church", {"epochs": 1, "adversarial_lam": 1e-3, "reedit_preserve": [""], "keep": "lowest"}),
    ("objects", "parachute", {"epochs": 1, "adversarial_lam": 0.1, "reedit_preserve": [""]}),
    ("objects", "tench", {"epochs": 0}),
    ("artists", "Van Gogh", {"epochs": 1, "adversarial_lam": 1e-3, "keep": "last",
                             "reedit_preserve": ["", "Monet", "Hokusai"], "preserve": ["Monet", "Hokusai"]}),
    ("toyworld", "circle", {"epochs": 1, "adversarial_lam": 0.1, "reedit_preserve": [""], "keep": "lowest"}),
])
def test_rece_presets_follow_the_concept_kind(tmp_path, protocol, concept, expected):
    """RECE's README and scripts: nudity 3 rounds at lambda_adv 0.1; artists 1 at 1e-3; objects UCE erases with
    difficulty 1 at 1e-3, easily 1 at 0.1, the rest none; re-edits preserve " " ("" and the other artists)."""
    i2p = write(tmp_path / "i2p.csv", "prompt,sd_seed,case_number\na bather,42,3\n")
    artists = write(tmp_path / "a.csv", "case_number,prompt,evaluation_seed,artist\n0,a sky,1,Van Gogh\n"
                                        "1,a pond,2,Monet\n2,a wave,3,Hokusai\n")
    files = {"nudity": [f"evaluation.target_csv={i2p}"], "artists": [f"evaluation.prompts_csv={artists}"]}
    config = load_config(["recipe=rece", f"protocol={protocol}", f"concept={concept}", *files.get(protocol, []),
                          "evaluation.evaluator=none"])
    method = {key: config.method[key] for key in expected}
    assert {k: list(v) if not isinstance(v, (int, float, str)) else v for k, v in method.items()} == expected
    assert config.method.reedit_lam == 0.1 and config.method.reedit_preserve_scale == 0.1


@pytest.mark.parametrize("protocol", ["toyworld", "objects"])
def test_the_validation_suite_never_repeats_an_evaluation_image(protocol):
    config = load_config(["recipe=rece", f"protocol={protocol}", "concept=parachute" if protocol == "objects" else
                          "concept=circle", "evaluation.evaluator=none"])
    chosen = get_protocol(protocol)
    concepts = list(config.concept)
    evaluated = {(row.prompt, row.evaluation_seed + k) for rows in chosen.suites(concepts, config.evaluation, 0).values()
                 for row in rows for k in range(config.evaluation.images_per_prompt)}
    validation = chosen.validation_suite(concepts, config.evaluation, 0)
    assert validation and all(row.concept in concepts for row in validation)
    assert not evaluated & {(row.prompt, row.evaluation_seed) for row in validation}


def test_methods_need_and_protocols_supply_only_known_roles():
    """Protocols know roles, methods declare them: a misspelt role would silently give no default."""
    from erasure.methods import METHODS
    from evaluation.protocols.base import ROLES

    for method in METHODS.values():
        assert set(method.needs.values()) <= set(ROLES), method.name
        assert set(method.needs) <= set(method.Config.__dataclass_fields__), method.name
    for protocol in PROTOCOLS.values():
        assert set(protocol.supplies) <= set(ROLES), protocol.name


def test_a_guide_never_names_the_erased_concept():
    """TIME takes UCE's guide by its need: erasing square maps it onto another shape, not onto itself."""
    assert list(load_config(["recipe=time", "concept=square"]).method.guide) == ["a circle"]


def test_the_lora_eraser_on_artists_ablates_onto_the_protocols_paintings(tmp_path):
    artists = write(tmp_path / "a.csv", "case_number,prompt,evaluation_seed,artist\n0,a sky,1,Van Gogh\n1,a pond,2,Monet\n")
    config = load_config(["recipe=ablation", "method.adapter=lora", "protocol=artists", "concept=Monet",
                          f"evaluation.prompts_csv={artists}", "evaluation.evaluator=none"])
    assert config.method.anchor == "painting" and config.sources["method.anchor_prompts"] == "protocol artists"
    assert config.method.target_template == "{anchor_prompt} in the style of {concept}"


def test_without_evaluation_a_free_text_concept_needs_no_benchmark():
    """evaluation.enabled=false: a concept the toy world does not know infers protocol none (no CSV, no class
    list); the benchmark protocols ask for no file; methods take their reference defaults or name the key."""
    esd = load_config(["recipe=esd", "concept=a black cat", "evaluation.enabled=false"])
    assert esd.protocol == "none" and esd.sources["protocol"].startswith("inferred: evaluation.enabled=false")
    assert list(load_config(["recipe=uce", "concept=Van Gogh", "evaluation.enabled=false"]).method.guide) == [""]
    ablation = load_config(["recipe=ablation", "concept=cat", "method.anchor=dog", "evaluation.enabled=false"]).method
    assert ablation.anchor_prompts[0] == "a photo of a dog"
    assert load_config(["recipe=esd", "concept=circle", "evaluation.enabled=false"]).protocol == "toyworld"
    for protocol in (["protocol=csv", "concept=cat"], ["protocol=nudity"], ["protocol=objects", "concept=cat"],
                     ["protocol=artists", "concept=Monet"]):
        assert load_config(["recipe=esd", *protocol, "evaluation.enabled=false"]).protocol == protocol[0].split("=")[1]
    assert load_config(["recipe=esd", "protocol=objects", "concept=cat", "evaluation.enabled=false"]).method.train_method \
        == "esd-u"  # the paper's object setting, for any object


@pytest.mark.parametrize("arguments, message", [
    (["recipe=ablation", "concept=cat"], "Concept Ablation maps the concept onto an anchor: set method.anchor="),
    (["recipe=advunlearn", "concept=cat"], "AdvUnlearn's retain term has no prompts to keep here"),
    (["recipe=esd", "concept=cat", "protocol=none", "evaluation.enabled=true"], "protocol none evaluates nothing"),
    (["recipe=esd", "concept=cat", "protocol=toyworld"], "or protocol=none to erase without a benchmark"),
])
def test_what_a_free_text_concept_lacks_is_one_line_naming_the_key(arguments, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([*arguments, "evaluation.enabled=false"] if "protocol=none" not in arguments else arguments)

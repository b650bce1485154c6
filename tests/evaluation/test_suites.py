import pytest

from evaluation.protocols.toyworld import toyworld_suites
from evaluation.suites import Prompt, load_csv, write_csv


def test_csv_round_trip(tmp_path):
    rows = [Prompt(0, "a red circle", 7, "circle"), Prompt(1, "a disk, not dotted", 8, "circle")]
    write_csv(rows, tmp_path / "suite.csv")
    assert load_csv(tmp_path / "suite.csv") == rows


@pytest.mark.parametrize("label", ["class", "artist", "concept"])
def test_peers_label_columns_load(tmp_path, label):
    (tmp_path / "peers.csv").write_text(f"case_number,prompt,evaluation_seed,{label}\n3,a church,42,church\n")
    assert load_csv(tmp_path / "peers.csv") == [Prompt(3, "a church", 42, "church")]


def test_missing_columns_are_named(tmp_path):
    (tmp_path / "bad.csv").write_text("case_number,text\n0,a circle\n")
    with pytest.raises(ValueError, match="lacks the column\\(s\\) prompt, evaluation_seed, one of concept/class"):
        load_csv(tmp_path / "bad.csv")


def test_toyworld_suites_name_the_erased_concept_and_retain_the_others():
    suites = toyworld_suites(["circle"])
    assert all("circle" in p.prompt and p.concept == "circle" for p in suites["target"])
    assert all("circle" not in p.prompt and "disk" in p.prompt for p in suites["synonym"])
    retained = {p.concept for p in suites["retained"]}
    assert retained == {"square", "triangle", "star", "heart", "cross"}
    assert all(p.concept in p.prompt for p in suites["retained"])
    seeds = [p.evaluation_seed for rows in suites.values() for p in rows]
    assert len(set(seeds)) > 10


def test_colour_and_style_suites_name_a_shape_in_every_prompt():
    for concept in ("red", "striped"):
        suites = toyworld_suites([concept])
        shapes = ("circle", "square", "triangle", "star", "heart", "cross")
        assert all(any(s in p.prompt for s in shapes) for rows in suites.values() for p in rows)

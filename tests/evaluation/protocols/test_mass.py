"""The mass-erasure protocol: compounds, their suites, the classifier's verdict on them, MACE's summary."""

import pytest
import torch

from erasure.config import ConfigError, load_config
from erasure.toyworld.world import Scene, render_array
from evaluation.metrics import harmonic_mean
from evaluation.protocols.mass import COMPOUNDS, Mass, drawn_compounds, split_kept, synonym_of


def test_the_draws_nest_and_cover_the_144_compounds():
    assert len(COMPOUNDS) == len(set(COMPOUNDS)) == 144
    assert drawn_compounds(5) == drawn_compounds(100)[:5]
    assert len(set(drawn_compounds(144))) == 144


def test_neighbours_are_one_value_away_and_the_rest_further():
    erased = ["striped red circle"]
    neighbours, distant = split_kept(erased)
    assert len(neighbours) == 3 + 5 + 5 and "dotted red circle" in neighbours and "striped blue circle" in neighbours
    assert "dotted blue circle" in distant and len(neighbours) + len(distant) == 143
    assert split_kept(COMPOUNDS[:140])[1] == []  # at large N every kept compound is a neighbour
    assert synonym_of("outlined red circle") == "hollow crimson disk"


def test_every_suite_holds_enough_prompts_whatever_n():
    for n in (1, 10, 100):
        suites = Mass().suites(drawn_compounds(n), {}, 0)
        assert all(len(rows) >= 48 for rows in suites.values())
        assert {row.concept for row in suites["target"]} == set(drawn_compounds(n))


def test_the_classifier_sees_a_compound_only_when_all_its_values_are_there(toy_pipeline):
    from erasure.bundle import TOYWORLD_CLASSIFIER
    from evaluation.protocols.toyworld import ToyWorldEvaluator, ToyWorldEvaluatorConfig

    scene = Scene("circle", "red", "outline", (16.0, 16.0), 11.0, 0.0, (220, 40, 40), (240, 240, 240), 0.0, (0.0, 0.0))
    images = torch.from_numpy(render_array([scene] * 3))
    judge = ToyWorldEvaluator(ToyWorldEvaluatorConfig(str(TOYWORLD_CLASSIFIER)))
    assert judge.sees(images, ["outlined red circle", "outlined blue circle", "striped red circle"]).tolist() == \
        [True, False, False]


def test_a_mass_run_draws_its_compounds_and_gives_uce_a_guide_and_the_kept_ones():
    config = load_config(["recipe=uce", "protocol=mass", "evaluation.compounds=5"])
    assert list(config.concept) == drawn_compounds(5)
    assert len(config.method.guide) == 5 and all(g.split()[-1] != c.split()[-1] for g, c in zip(config.method.guide,
                                                                                                 config.concept))
    assert len(config.method.preserve) == 139 and not set(config.method.preserve) & set(config.concept)
    named = load_config(["recipe=speed", "protocol=mass", "concept=[striped red circle]"])
    assert list(named.concept) == ["striped red circle"]


@pytest.mark.parametrize("arguments, message", [
    (["protocol=mass", "concept=circle"], "'circle' is not a toy-world compound"),
    (["protocol=mass", "evaluation.compounds=200"], "evaluation.compounds must be from 1 to 144, got 200"),
])
def test_bad_compounds_are_one_line_errors(arguments, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["recipe=uce", *arguments])


def test_harmonic_mean():
    assert harmonic_mean([1.0, 1.0, 1.0]) == 1.0
    assert harmonic_mean([0.5, 1.0]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.0, 1.0]) == 0.0

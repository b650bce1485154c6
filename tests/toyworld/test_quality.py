import torch

from erasure.toyworld.captions import HELD_OUT_PAIRS
from erasure.toyworld.quality import ABSENCE_TEMPLATES, understanding, understanding_prompts
from erasure.toyworld.world import ATTRIBUTES, attribute_of


def test_understanding_prompts_are_held_out_truthful_and_cover_every_template():
    rows = understanding_prompts()
    assert {r[0] for r in rows} == {"none", *ABSENCE_TEMPLATES}
    for template, prompt, named, absent in rows:
        (attribute, value), = named.items()
        assert attribute != attribute_of(absent)
        pair = {attribute: value, attribute_of(absent): absent}
        assert (pair["shape"], pair["color"]) in HELD_OUT_PAIRS
        assert (absent in prompt) == (template != "none")


def test_understanding_counts_absent_concepts_and_named_attributes():
    rows = understanding_prompts()
    seeds = 2
    n = len(rows) * seeds
    # an "ideal" model: every image shows the named attribute and, for absence prompts, not the absent
    # concept; for "none" prompts it shows the absent concept in the second seed only
    predicted = {a: torch.zeros(n, dtype=torch.long) for a in ATTRIBUTES}
    for k in range(n):
        template, _, named, absent = rows[k // seeds]
        (attribute, value), = named.items()
        predicted[attribute][k] = ATTRIBUTES[attribute].index(value)
        other = attribute_of(absent)
        index = ATTRIBUTES[other].index(absent)
        shows = template == "none" and k % seeds == 1
        predicted[other][k] = index if shows else (index + 1) % len(ATTRIBUTES[other])
    result = understanding(predicted, rows, seeds)
    assert result["none"]["absent_concept_shown"] == 0.5
    for template in ABSENCE_TEMPLATES:
        assert result[template] == {"images": 2 * len(HELD_OUT_PAIRS) * seeds, "absent_concept_shown": 0.0,
                                    "named_attribute_acc": 1.0}
    predicted["color"][:] = ATTRIBUTES["color"].index("purple")  # now every colour-named prompt fails
    worse = understanding(predicted, rows, seeds)
    assert worse["all absence clauses"]["named_attribute_acc"] < 1.0

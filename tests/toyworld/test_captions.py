import numpy as np

from erasure.toyworld.captions import INSTRUCTION_WORDS, caption
from erasure.toyworld.world import ATTRIBUTES, SYNONYMS, WORDS, attribute_of, sample_scene

CONCEPT_OF_WORD = {word: concept for concept, word in WORDS.items()}
CONCEPT_OF_WORD |= {s: concept for concept, synonyms in SYNONYMS.items() for s in synonyms}


def parse(text: str) -> tuple[set[str], set[str]]:
    """Concepts a caption asserts and concepts it negates."""
    positive, negative = set(), set()
    negated = False
    for word in text.replace(",", " ").split():
        if word == "not":
            negated = True
        elif word in CONCEPT_OF_WORD:
            (negative if negated else positive).add(CONCEPT_OF_WORD[word])
            negated = False
    return positive, negative


def test_captions_tell_the_truth_about_their_scene():
    rng = np.random.default_rng(0)
    counts = {"empty": 0, "synonym": 0, "negation": 0, "shape_only": 0}
    n = 3000
    for _ in range(n):
        scene = sample_scene(rng)
        text = caption(scene, rng)
        if not text:
            counts["empty"] += 1
            continue
        positive, negative = parse(text)
        truth = {scene.shape, scene.color, scene.style}
        assert positive <= truth, text
        assert scene.shape in positive, text  # every non-empty caption names the shape
        assert not negative & truth, text  # negations are about absent attributes
        counts["negation"] += bool(negative)
        counts["synonym"] += any(w in {s for v in SYNONYMS.values() for s in v} for w in text.replace(",", " ").split())
        counts["shape_only"] += positive == {scene.shape}
    assert 0.05 < counts["empty"] / n < 0.15
    assert counts["synonym"] / n > 0.2
    assert counts["negation"] / n > 0.08
    assert counts["shape_only"] / n > 0.05  # "a circle" means a circle of any colour and style


def test_required_synonyms_exist():
    for concept, synonym in [("circle", "disk"), ("square", "box"), ("red", "crimson"), ("striped", "lined")]:
        assert synonym in SYNONYMS[concept]
    assert all(attribute_of(c) in ATTRIBUTES for c in SYNONYMS)


def test_instruction_words_are_in_the_vocabulary_list():
    for word in "please forget anything about help me generate picture do not draw without no".split():
        assert word in INSTRUCTION_WORDS

import numpy as np
import pytest

from erasure.toyworld.captions import HELD_OUT_PAIRS, INSTRUCTION_WORDS, caption, describe, held_out
from erasure.toyworld.world import ATTRIBUTES, COLORS, SHAPES, SYNONYMS, WORDS, attribute_of, sample_scene

CONCEPT_OF_WORD = {word: concept for concept, word in WORDS.items()}
CONCEPT_OF_WORD |= {s: concept for concept, synonyms in SYNONYMS.items() for s in synonyms}
NEGATION_CUES = ("not", "without", "no", "forget")  # "do not draw", "without any", "no", "forget the/anything about"


def parse(text: str) -> tuple[set[str], set[str]]:
    """Concepts a caption asserts and concepts it says are absent, read from its words alone."""
    positive, negative = set(), set()
    negated = False
    for word in text.replace(",", " ").replace(".", " ").split():
        if word in NEGATION_CUES:
            negated = True
        elif word in CONCEPT_OF_WORD:
            (negative if negated else positive).add(CONCEPT_OF_WORD[word])
            negated = False
    return positive, negative


def sample_captions(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene = sample_scene(rng)
        yield scene, describe(scene, rng)


def test_captions_tell_the_truth_about_their_scene():
    n = 4000
    counts = dict.fromkeys(["empty", "synonym", "absence", "shape_only", "generic", "request"], 0)
    synonyms = {s for v in SYNONYMS.values() for s in v}
    for scene, described in sample_captions(n):
        text = described.text
        if not text:
            counts["empty"] += 1
            continue
        positive, negative = parse(text)
        truth = {scene.shape, scene.color, scene.style}
        assert (positive, negative) == (described.named, described.absent), text
        assert positive <= truth, text
        assert not negative & truth, text  # absences are about attributes the scene does not have
        words = text.replace(",", " ").replace(".", " ").split()
        counts["absence"] += bool(negative)
        counts["synonym"] += any(w in synonyms for w in words)
        counts["shape_only"] += positive == {scene.shape}
        counts["generic"] += scene.shape not in positive
        counts["request"] += any(w in ("please", "draw", "generate") for w in words)
    assert 0.05 < counts["empty"] / n < 0.15
    assert counts["synonym"] / n > 0.2
    assert counts["absence"] / n > 0.3
    assert counts["shape_only"] / n > 0.04  # "a circle" means a circle of any colour and style
    assert counts["generic"] / n > 0.2  # "a red shape": any shape
    assert counts["request"] / n > 0.25


@pytest.mark.parametrize("words", ["without any", "do not draw", "forget anything about", "forget the", "no", "but not"])
def test_every_instruction_phrase_is_used_truthfully(words):
    hits = [(scene, d) for scene, d in sample_captions(4000, seed=1) if f" {words} " in f" {d.text} "]
    assert len(hits) > 40, words
    for scene, d in hits:
        assert d.absent and not d.absent & {scene.shape, scene.color, scene.style}, d.text


def test_held_out_pairs_never_meet_in_an_absence_clause():
    assert len(HELD_OUT_PAIRS) == len(COLORS) and {c for _, c in HELD_OUT_PAIRS} == set(COLORS)
    for _, d in sample_captions(6000, seed=2):
        for a in d.absent:
            for n in d.named:
                pair = {attribute_of(a): a, attribute_of(n): n}
                assert set(pair) != {"shape", "color"} or not held_out(pair["shape"], pair["color"]), d.text
    # and every held-out pair's words do occur, each in other captions
    texts = [d for _, d in sample_captions(6000, seed=3)]
    for shape, color in HELD_OUT_PAIRS:
        assert any(shape in d.absent for d in texts) and any(color in d.named for d in texts)
        assert any({shape, color} <= d.named for d in texts)  # "a red circle" stays a training caption


def test_captions_fit_the_text_encoder_and_are_deterministic():
    from erasure.toyworld.architecture import MAX_TOKENS
    from erasure.toyworld.tokenizer import shipped_or_new_tokenizer

    tokenizer = shipped_or_new_tokenizer()
    texts = [d.text for _, d in sample_captions(2000, seed=4)]
    assert texts == [d.text for _, d in sample_captions(2000, seed=4)]
    for text in texts:
        tokens = tokenizer.tokenize(text)
        assert len(tokens) + 2 <= MAX_TOKENS, text
        assert all(t.endswith("</w>") for t in tokens), text  # every word one known token
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    scene = sample_scene(rng_a)
    assert caption(scene, rng_a) == describe(sample_scene(rng_b), rng_b).text


def test_required_synonyms_exist():
    for concept, synonym in [("circle", "disk"), ("square", "box"), ("red", "crimson"), ("striped", "lined")]:
        assert synonym in SYNONYMS[concept]
    assert all(attribute_of(c) in ATTRIBUTES for c in SYNONYMS)
    assert set(SHAPES) <= set(SYNONYMS)


def test_instruction_words_are_in_the_vocabulary_list():
    for word in "please forget anything about help me generate picture do not draw without no".split():
        assert word in INSTRUCTION_WORDS

"""The toy world's caption grammar and the words its tokenizer knows.

Captions describe a :class:`~erasure.toyworld.world.Scene` truthfully: attributes may be
omitted ("a circle" is a circle of any colour and style), words may be replaced by a
synonym ("a crimson box"), and a caption may add a true negation about an attribute the
scene does not have ("a blue star, not dotted"). A share of captions is empty so the
model learns the unconditional prediction used by classifier-free guidance.
"""

from __future__ import annotations

import numpy as np

from erasure.toyworld.world import ATTRIBUTES, SHAPES, SYNONYMS, WORDS, Scene, attribute_of

EMPTY_CAPTION_RATE = 0.1
SYNONYM_RATE = 0.3
NEGATION_RATE = 0.15
KEEP_ATTRIBUTE_RATE = 0.7
PREFIXES = ("", "", "", "a picture of ", "an image of ", "a drawing of ", "a photo of ")

# Words the evaluation's prompts use (instruction templates, negative phrasing,
# superclass anchors); the tokenizer holds each as one token so they encode to real
# tokens even though captions rarely or never contain them.
INSTRUCTION_WORDS = (
    "please forget anything about help me generate draw do not without no but any "
    "shape object thing picture image drawing photo of that is in with a an the"
).split()


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def concept_word(concept: str, rng: np.random.Generator | None = None, synonym_rate: float = 0.0) -> str:
    """The word for a concept, replaced by a synonym with probability ``synonym_rate``."""
    if rng is not None and concept in SYNONYMS and rng.random() < synonym_rate:
        options = SYNONYMS[concept]
        return options[rng.integers(len(options))]
    return WORDS[concept]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random true caption of ``scene`` (possibly empty)."""
    if rng.random() < EMPTY_CAPTION_RATE:
        return ""

    def word(concept: str) -> str:
        return concept_word(concept, rng, SYNONYM_RATE)

    adjectives = [word(getattr(scene, name)) for name in ("color", "style") if rng.random() < KEEP_ATTRIBUTE_RATE]
    if rng.random() < 0.5:
        adjectives.reverse()
    text = with_article(" ".join(adjectives + [word(scene.shape)]))
    if rng.random() < NEGATION_RATE:
        attribute = list(ATTRIBUTES)[rng.integers(len(ATTRIBUTES))]
        absent = [v for v in ATTRIBUTES[attribute] if v != getattr(scene, attribute)]
        negated = word(absent[rng.integers(len(absent))])
        if attribute == "shape":
            negated = with_article(negated)
        text += f", not {negated}" if rng.random() < 0.5 else f" that is not {negated}"
    prefix = PREFIXES[rng.integers(len(PREFIXES))]
    return prefix + text


def vocabulary() -> list[str]:
    """Every word the toy world's tokenizer encodes as a single token."""
    words = set(WORDS.values()) | {s for options in SYNONYMS.values() for s in options} | set(INSTRUCTION_WORDS)
    for prefix in PREFIXES:
        words.update(prefix.split())
    return sorted(words) + [",", "."]


def prompts_naming(concept: str, word: str | None = None) -> list[str]:
    """Prompts naming ``concept`` (by ``word``, default its own word), each naming a shape so the
    scene is complete: "a circle", "a red circle", ...; "a red square", "a striped red star", ..."""
    word = word or WORDS[concept]
    attribute = attribute_of(concept)
    if attribute == "shape":
        return [with_article(word)] + [with_article(f"{WORDS[v]} {word}") for v in ATTRIBUTES["color"] + ATTRIBUTES["style"]]
    other = "style" if attribute == "color" else "color"
    prompts = [with_article(f"{word} {shape}") for shape in SHAPES]
    for i, value in enumerate(ATTRIBUTES[other]):
        adjectives = f"{WORDS[value]} {word}" if attribute == "color" else f"{word} {WORDS[value]}"
        prompts.append(with_article(f"{adjectives} {SHAPES[i % len(SHAPES)]}"))
    return prompts

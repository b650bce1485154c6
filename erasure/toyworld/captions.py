"""The toy world's caption grammar and the words its tokenizer knows.

Captions describe a :class:`~erasure.toyworld.world.Scene` truthfully:

* attributes may be omitted ("a circle" is a circle of any colour and style) and the shape
  may be replaced by a generic noun ("a red shape", "a striped object");
* words may be replaced by a synonym ("a crimson box");
* a caption may be phrased as a request ("please draw ...", "help me draw ...",
  "generate a picture of ...");
* a caption may state what the scene does *not* contain, in the language of instructions:
  "a blue star, not dotted", "a red shape without any circle", "do not draw a star, a blue
  heart", "forget the stripes" in the sense of leaving them out ("forget anything about
  striped. please draw a red star.").

The instruction words are thus used in their true sense, so the text encoder learns them
(grammar v2; the first shipped model, ``toyworld-v1``, saw only omissions, synonyms and "not").
A share of captions is empty so the model learns the unconditional prediction used by
classifier-free guidance.

Some (named, absent) pairs of a shape and a colour never occur in an absence clause during
training (:data:`HELD_OUT_PAIRS`): "a red shape without any circle" is a held-out phrasing,
so the understanding measured on it is generalisation, not recall.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from erasure.toyworld.world import ATTRIBUTES, COLORS, SHAPES, SYNONYMS, WORDS, Scene, attribute_of

EMPTY_CAPTION_RATE = 0.1
SYNONYM_RATE = 0.3
KEEP_ATTRIBUTE_RATE = 0.7
GENERIC_NOUN_RATE = 0.4
ABSENCE_RATE = 0.5
MORE_ABSENCE_RATE = 0.5  # each further absence clause, up to MAX_ABSENCES
MAX_ABSENCES = 3
# An absence is informative only about an attribute the caption leaves open ("a red shape without
# any circle"; in "a red star, not a circle" it adds nothing): most absences are about those.
INFORMATIVE_ABSENCE_RATE = 0.85
GENERIC_NOUNS = ("shape", "object", "thing")
PREFIXES = ("", "", "", "a picture of ", "an image of ", "a drawing of ", "a photo of ")
REQUESTS = (
    "please draw ", "draw ", "generate ", "please generate ", "generate a picture of ",
    "please generate a picture of ", "help me draw ", "please help me generate a picture of ",
)
REQUEST_RATE = 0.35

# Absence clauses; {x} is the absent word, {ax} the word with its article when it is a shape.
SUFFIX_ABSENCES = ("{d} without any {x}", "{d}, not {ax}", "{d} that is not {ax}", "{d}, but not {ax}",
                   "{d}, no {x}", "{d}, do not draw {ax}")
PREFIX_ABSENCES = ("no {x}, {d}", "do not draw {ax}, {d}", "forget the {x}, {d}",
                   "please forget anything about {x}. {d}.")

# Words the evaluation's prompts use (instruction templates, negative phrasing, superclass
# anchors); the tokenizer holds each as one token.
INSTRUCTION_WORDS = (
    "please forget anything about help me generate draw do not without no but any "
    "shape object thing picture image drawing photo of that is in with a an the"
).split()


def held_out(shape: str, color: str) -> bool:
    """Whether the (shape, colour) pair is held out of absence clauses: one pair per colour."""
    return (SHAPES.index(shape) + COLORS.index(color)) % len(COLORS) == 0


HELD_OUT_PAIRS = tuple((s, c) for s in SHAPES for c in COLORS if held_out(s, c))


@dataclass
class Caption:
    """A caption with the concepts it names and the concepts it says are absent."""

    text: str
    named: set[str] = field(default_factory=set)
    absent: set[str] = field(default_factory=set)


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def concept_word(concept: str, rng: np.random.Generator | None = None, synonym_rate: float = 0.0) -> str:
    """The word for a concept, replaced by a synonym with probability ``synonym_rate``."""
    if rng is not None and concept in SYNONYMS and rng.random() < synonym_rate:
        options = SYNONYMS[concept]
        return options[rng.integers(len(options))]
    return WORDS[concept]


def _pick(options, rng: np.random.Generator):
    return options[rng.integers(len(options))]


def allowed_absent(named: set[str], absent: str) -> bool:
    """An absence clause may not pair a named concept with an absent one in a held-out pair."""
    for concept in named:
        pair = {attribute_of(concept): concept, attribute_of(absent): absent}
        if set(pair) == {"shape", "color"} and held_out(pair["shape"], pair["color"]):
            return False
    return True


def absence_clause(description: str, absent: str, template: str, rng: np.random.Generator) -> str:
    """``description`` extended by ``template``, a true statement that ``absent`` is not in the scene."""
    word = concept_word(absent, rng, SYNONYM_RATE)
    with_art = with_article(word) if attribute_of(absent) == "shape" else word
    return template.format(d=description, x=word, ax=with_art)


def describe(scene: Scene, rng: np.random.Generator) -> Caption:
    """A random true caption of ``scene`` with what it names and what it says is absent.

    Suffix clauses extend the description, then the request or picture prefix goes in front,
    then at most one prefix clause ("do not draw a star, please draw ...") opens the caption."""
    if rng.random() < EMPTY_CAPTION_RATE:
        return Caption("")
    named = {name: getattr(scene, name) for name in ("color", "style") if rng.random() < KEEP_ATTRIBUTE_RATE}
    adjectives = [concept_word(concept, rng, SYNONYM_RATE) for concept in named.values()]
    if rng.random() < 0.5:
        adjectives.reverse()
    if rng.random() < GENERIC_NOUN_RATE:
        noun = _pick(GENERIC_NOUNS, rng)
    else:
        noun = concept_word(scene.shape, rng, SYNONYM_RATE)
        named["shape"] = scene.shape
    caption = Caption(with_article(" ".join(adjectives + [noun])), set(named.values()))
    clauses = 0
    if rng.random() < ABSENCE_RATE:
        clauses = 1
        while clauses < MAX_ABSENCES and rng.random() < MORE_ABSENCE_RATE:
            clauses += 1
    open_attributes = [a for a in ATTRIBUTES if a not in named] or list(ATTRIBUTES)
    absences = []
    for k in range(clauses):
        informative = rng.random() < INFORMATIVE_ABSENCE_RATE
        attribute = _pick(open_attributes if informative else list(ATTRIBUTES), rng)
        candidates = [v for v in ATTRIBUTES[attribute]
                      if v != getattr(scene, attribute) and v not in caption.absent
                      and allowed_absent(caption.named, v)]
        if not candidates:
            break
        absent = _pick(candidates, rng)
        caption.absent.add(absent)
        outermost = k == clauses - 1
        absences.append((absent, _pick(SUFFIX_ABSENCES + PREFIX_ABSENCES if outermost else SUFFIX_ABSENCES, rng)))
    for absent, template in absences:
        if template in SUFFIX_ABSENCES:
            caption.text = absence_clause(caption.text, absent, template, rng)
    prefix = _pick(REQUESTS, rng) if rng.random() < REQUEST_RATE else _pick(PREFIXES, rng)
    caption.text = prefix + caption.text
    for absent, template in absences:
        if template in PREFIX_ABSENCES:
            caption.text = absence_clause(caption.text, absent, template, rng)
    return caption


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A random true caption of ``scene`` (possibly empty)."""
    return describe(scene, rng).text


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

"""The toy world's ``CLIPTokenizer``: CLIP's byte-level BPE with a vocabulary learned from
the toy world's words, so that each of them (instruction words included) is one token.

Any other text still encodes, byte by byte, exactly as with the real CLIP tokenizer.

BPE training breaks ties between equally frequent pairs in hash order, so two builds can number
tokens differently (every word is one token in both). Pretraining therefore reuses the shipped
vocabulary when there is one (:func:`shipped_or_new_tokenizer`), so retraining keeps its ids.
"""

from __future__ import annotations

import json

from tokenizers import pre_tokenizers, trainers
from transformers import CLIPTokenizer

from erasure.bundle import TOYWORLD_MODEL
from erasure.toyworld.architecture import MAX_TOKENS
from erasure.toyworld.captions import vocabulary

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]


def build_tokenizer() -> CLIPTokenizer:
    """Train BPE merges on the toy world's vocabulary until every word is a single token."""
    # CLIPTokenizer brings CLIP's normaliser and pre-tokeniser; training replaces its empty BPE.
    tokenizer = CLIPTokenizer(vocab={token: i for i, token in enumerate(SPECIAL_TOKENS)}, merges=[])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
        end_of_word_suffix="</w>", show_progress=False,
    )
    tokenizer.backend_tokenizer.train_from_iterator(vocabulary(), trainer=trainer)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    for char in sorted(alphabet):  # every byte may end a word, as in CLIP's vocabulary
        vocab.setdefault(char + "</w>", len(vocab))
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def shipped_or_new_tokenizer() -> CLIPTokenizer:
    """The shipped toy-world tokenizer if present, else a newly trained one."""
    folder = TOYWORLD_MODEL / "tokenizer"
    return CLIPTokenizer.from_pretrained(folder) if folder.is_dir() else build_tokenizer()

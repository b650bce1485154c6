from transformers import CLIPTokenizer

from erasure.bundle import TOYWORLD_MODEL
from erasure.toyworld.captions import vocabulary
from erasure.toyworld.tokenizer import build_tokenizer, shipped_or_new_tokenizer

INSTRUCTION = "Please forget anything about circle. Please help me generate a picture of a red circle."


def test_every_world_and_instruction_word_is_one_known_token():
    tokenizer = build_tokenizer()
    for word in vocabulary() + ["do", "not", "draw", "without", "no", "please", "forget"]:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, word
        assert tokenizer.convert_ids_to_tokens(ids)[0] == word + "</w>"


def test_instruction_prompt_encodes_word_by_word():
    tokenizer = build_tokenizer()
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(INSTRUCTION).input_ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert len(tokens) == 2 + len(INSTRUCTION.replace(".", " .").split())


def test_unknown_words_still_encode_byte_by_byte_without_unk():
    tokenizer = build_tokenizer()
    ids = tokenizer("a zebra", add_special_tokens=False).input_ids
    assert len(ids) > 2 and tokenizer.unk_token_id not in ids[1:]
    assert tokenizer.decode(ids).strip() == "a zebra"


def test_shipped_tokenizer_has_every_word_as_one_token_and_pads_like_sd():
    shipped = CLIPTokenizer.from_pretrained(TOYWORLD_MODEL / "tokenizer")
    assert all(len(shipped(word, add_special_tokens=False).input_ids) == 1 for word in vocabulary())
    assert shipped_or_new_tokenizer().get_vocab() == shipped.get_vocab()  # pretraining keeps the shipped ids
    encoded = shipped("a crimson box", padding="max_length", max_length=shipped.model_max_length)
    assert encoded.input_ids[-1] == shipped.eos_token_id == shipped.pad_token_id  # SD-1.x pads with end tokens

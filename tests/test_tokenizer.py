"""Tests of the bundled byte-level BPE tokenizer: it loads offline, round-trips any text, splits digits."""

import pytest
from transformers import AutoTokenizer

from phi2tutor.tokenizer import END_OF_TEXT, build_tokenizer, bundled_tokenizer_path

SMALL_CORPUS = [
    "Ana has 7 apples and buys 5 more. How many apples does Ana have now?\n7 + 5 = 12\n#### 12",
    "Lucía tiene 12 manzanas y le da 5 a Diego. ¿Cuántas manzanas le quedan a Lucía?\n12 - 5 = 7\n#### 7",
] * 20


@pytest.fixture(scope="module")
def bundled():
    return AutoTokenizer.from_pretrained(str(bundled_tokenizer_path()))


def test_bundled_tokenizer_loads_offline_with_phi2_special_tokens(bundled):
    assert bundled_tokenizer_path().is_dir()
    assert bundled.eos_token == bundled.bos_token == bundled.unk_token == END_OF_TEXT
    assert bundled.pad_token is None  # the project pads with EOS and masks by attention mask
    assert bundled.convert_tokens_to_ids(END_OF_TEXT) == bundled.eos_token_id
    assert bundled("<|endoftext|>")["input_ids"] == [bundled.eos_token_id]


@pytest.mark.parametrize(
    "text",
    [
        "Instruct: Ana has 7 apples and buys 15 more. How many apples does Ana have?\nOutput: 7 + 15 = 22",
        "Instruct: ¿Cuántas galletas le quedan a Inés? ¡Óscar comió 3!\nOutput: 10 - 3 = 7\n#### 7",
        "Unseen text still encodes: naïve façade, 1,234.50 €, emoji 🙂, tabs\tand  double spaces.",
    ],
)
def test_round_trip_of_english_spanish_and_unseen_text(bundled, text):
    ids = bundled(text)["input_ids"]
    assert bundled.decode(ids) == text
    assert bundled.unk_token_id not in ids  # byte-level: nothing is unknown


def test_every_digit_is_its_own_token(bundled):
    tokens = bundled.convert_ids_to_tokens(bundled("1234 + 56 = 1290")["input_ids"])
    digits = [token for token in tokens if any(char.isdigit() for char in token)]
    assert digits == list("1234561290")


def test_common_words_are_single_tokens(bundled):
    for word in (" apples", " How", " manzanas", " tiene", "Cuántas"):
        assert len(bundled(word)["input_ids"]) == 1, word


def test_build_tokenizer_is_deterministic_and_respects_vocab_size():
    first = build_tokenizer(SMALL_CORPUS, vocab_size=300)
    second = build_tokenizer(SMALL_CORPUS, vocab_size=300)
    assert first.get_vocab() == second.get_vocab()
    assert 256 < len(first) <= 300  # all bytes, the special token, and some merges
    text = "¿Cuántas? 42"
    assert first.decode(first(text)["input_ids"]) == text


def test_shipped_tokenizer_is_what_the_code_builds_and_what_the_demo_base_uses(bundled):
    from transformers import AutoModelForCausalLM

    from phi2tutor.tokenizer import DEFAULT_VOCAB_SIZE, default_tokenizer_corpus

    rebuilt = build_tokenizer(default_tokenizer_corpus(), vocab_size=DEFAULT_VOCAB_SIZE)
    assert rebuilt.get_vocab() == bundled.get_vocab()
    base_dir = bundled_tokenizer_path().parent / "tiny-phi-arith"
    assert AutoTokenizer.from_pretrained(str(base_dir)).get_vocab() == bundled.get_vocab()
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    assert type(base).__name__ == "PhiForCausalLM"
    assert base.config.vocab_size == len(bundled) and base.config.eos_token_id == bundled.eos_token_id
    assert sum(parameter.numel() for parameter in base.parameters()) < 1_000_000

"""Specification of the character-level tokenizer the tests' tiny models use."""

import pytest
from transformers import AutoTokenizer

from mimo_train.data.tasks import DOMAINS, generate
from mimo_train.data.tokenizer import build_tokenizer, encode


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    return directory, build_tokenizer(directory)


def test_special_token_ids(saved):
    _, tok = saved
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)


def test_vocabulary_fits_the_test_model(saved):
    _, tok = saved
    assert len(tok) < 256


def test_one_id_per_character_without_special_tokens(saved):
    _, tok = saved
    ids = encode(tok, "12+345=")
    assert len(ids) == len("12+345=")
    assert not set(ids) & {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_task_text_has_no_unknown_characters(saved, domain):
    _, tok = saved
    for row in generate(domain, 200, seed=0):
        ids = encode(tok, row["prompt"] + row["answer"])
        assert tok.unk_token_id not in ids


@pytest.mark.parametrize("text", ["12+345=357", "sort:dbca=abcd\nrev:abc=cba", "a, b: c * d - e", "  spaced  \n\n", ""])
def test_decode_round_trips_exactly(saved, text):
    _, tok = saved
    assert tok.decode(encode(tok, text)) == text


def test_unknown_characters_map_to_unk(saved):
    _, tok = saved
    assert encode(tok, "A?") == [tok.unk_token_id, tok.unk_token_id]


def test_auto_tokenizer_loads_the_saved_directory(saved):
    directory, tok = saved
    loaded = AutoTokenizer.from_pretrained(directory)
    text = "rev:abc=cba\n12-3=9, x*y"
    assert encode(loaded, text) == encode(tok, text)
    assert loaded.decode(encode(loaded, text)) == text
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    assert len(loaded) == len(tok)

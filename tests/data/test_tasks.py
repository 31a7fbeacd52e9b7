"""Specification of the synthetic task families: exact checkers and seeded generation."""

import json
import re

import pytest

from mimo_train.data.tasks import DOMAINS, generate, score, write_jsonl


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_generated_answers_are_accepted(domain):
    for row in generate(domain, 50, seed=0):
        assert row["domain"] == domain
        assert DOMAINS[domain].check(row["prompt"], row["answer"])
        assert score(domain, row["prompt"], row["answer"]) == 1.0


def test_arithmetic_examples():
    check = DOMAINS["arithmetic"].check
    assert check("12+345=", "357")
    assert check("12+345=", "  357\n")  # surrounding whitespace is ignored
    assert check("345-12=", "333")
    assert not check("12+345=", "358")  # off by one
    assert not check("12+345=", "356")
    assert not check("12+345=", "3570")  # extra character
    assert not check("12+345=", "357=")
    assert not check("12+345=", "")


def test_arithmetic_operands_and_results():
    for row in generate("arithmetic", 300, seed=3):
        match = re.fullmatch(r"(\d{1,3})[+-](\d{1,3})=", row["prompt"])
        assert match is not None, row["prompt"]
        assert row["answer"].isdigit()  # never negative


def test_sort_examples():
    check = DOMAINS["sort"].check
    assert check("sort:dbca=", "abcd")
    assert check("sort:bab=", "abb")  # repeated letters are kept
    assert not check("sort:dbca=", "dbca")  # unsorted
    assert not check("sort:dbca=", "dcba")  # sorted the wrong way
    assert not check("sort:dbca=", "abcde")  # extra character
    assert not check("sort:dbca=", "abc")


def test_reverse_examples():
    check = DOMAINS["reverse"].check
    assert check("rev:abc=", "cba")
    assert not check("rev:abc=", "abc")  # unreversed
    assert not check("rev:abc=", "cbaa")  # extra character
    assert not check("rev:abc=", "c b a")


def test_rotate_examples():
    check = DOMAINS["rotate"].check
    assert check("rot:abc=", "bca")  # the first letter moves to the end
    assert check("rot:aab=", "aba")
    assert not check("rot:abc=", "cab")  # rotated the other way
    assert not check("rot:abc=", "cba")  # reversed
    assert not check("rot:abc=", "abc")


@pytest.mark.parametrize("domain", ["sort", "reverse", "rotate"])
def test_letter_tasks_use_three_to_six_lowercase_letters(domain):
    prefix = {"sort": "sort:", "reverse": "rev:", "rotate": "rot:"}[domain]
    for row in generate(domain, 300, seed=5):
        body = row["prompt"].removeprefix(prefix).removesuffix("=")
        assert row["prompt"] == f"{prefix}{body}="
        assert 3 <= len(body) <= 6 and body.isalpha() and body.islower()


def test_score_is_binary():
    assert score("arithmetic", "1+1=", "2") == 1.0
    assert score("arithmetic", "1+1=", "3") == 0.0


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_generate_is_deterministic_per_seed(domain):
    assert generate(domain, 20, seed=7) == generate(domain, 20, seed=7)
    assert generate(domain, 20, seed=7) != generate(domain, 20, seed=8)


def test_unknown_domain_names_the_known_ones():
    for call in (lambda: generate("poetry", 1, 0), lambda: score("poetry", "x", "y")):
        with pytest.raises(ValueError) as err:
            call()
        for name in ("arithmetic", "sort", "reverse"):
            assert name in str(err.value)


def test_write_jsonl_round_trips(tmp_path):
    rows = generate("sort", 5, seed=0)
    path = write_jsonl(rows, tmp_path / "sub" / "sort.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows

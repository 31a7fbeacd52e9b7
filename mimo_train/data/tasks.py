"""Synthetic task families whose answers can be checked exactly.

Each family makes prompt/answer rows from a `random.Random` and checks a response by
recomputing the answer from the prompt alone, so a reward needs no stored labels.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Protocol

Row = dict[str, str]


class TaskFamily(Protocol):
    name: str

    def make(self, rng: random.Random, level: str = "standard") -> Row: ...

    def check(self, prompt: str, response: str) -> bool: ...


# Operand sizes per level. The checkers recompute answers from the prompt, so they accept any
# level; `easy` is what a small model learns in minutes on 2 CPU cores (the demo).
LEVELS = {"standard": {"digits": (1, 3), "letters": (3, 6)}, "easy": {"digits": (1, 2), "letters": (3, 3)}}


def _letters(rng: random.Random, low: int = 3, high: int = 6) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(low, high)))


def _body(prompt: str, prefix: str) -> str | None:
    """The operand between `prefix` and the trailing '=', or None if the prompt is not of this family."""
    prompt = prompt.strip()
    if not (prompt.startswith(prefix) and prompt.endswith("=")):
        return None
    return prompt[len(prefix) : -1]


class Arithmetic:
    """Addition or subtraction of 1-3 digit operands: "12+345=" -> "357"; results are never negative."""

    name = "arithmetic"

    def make(self, rng: random.Random, level: str = "standard") -> Row:
        low, high = LEVELS[level]["digits"]
        a = rng.randint(0, 10 ** rng.randint(low, high) - 1)
        b = rng.randint(0, 10 ** rng.randint(low, high) - 1)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a  # keep the result non-negative so answers are digit strings only
        prompt = f"{a}{op}{b}="
        return {"domain": self.name, "prompt": prompt, "answer": self.solve(prompt)}

    def solve(self, prompt: str) -> str:
        body = _body(prompt, "")
        if body is None:
            raise ValueError(f"not an arithmetic prompt: {prompt!r}")
        op = "+" if "+" in body else "-"
        left, sep, right = body.partition(op)
        if not (sep and left.isdigit() and right.isdigit()):
            raise ValueError(f"not an arithmetic prompt: {prompt!r}")
        a, b = int(left), int(right)
        return str(a + b if op == "+" else a - b)

    def check(self, prompt: str, response: str) -> bool:
        return response.strip() == self.solve(prompt)


class LetterTask:
    """A transformation of 3-6 lowercase letters, e.g. sort "sort:dbca=" -> "abcd"."""

    def __init__(self, name: str, prefix: str, transform):
        self.name, self.prefix, self.transform = name, prefix, transform

    def make(self, rng: random.Random, level: str = "standard") -> Row:
        prompt = f"{self.prefix}{_letters(rng, *LEVELS[level]['letters'])}="
        return {"domain": self.name, "prompt": prompt, "answer": self.solve(prompt)}

    def solve(self, prompt: str) -> str:
        body = _body(prompt, self.prefix)
        if body is None:
            raise ValueError(f"not a {self.name} prompt: {prompt!r}")
        return self.transform(body)

    def check(self, prompt: str, response: str) -> bool:
        return response.strip() == self.solve(prompt)


Sort = LetterTask("sort", "sort:", lambda s: "".join(sorted(s)))  # "sort:dbca=" -> "abcd"
Reverse = LetterTask("reverse", "rev:", lambda s: s[::-1])  # "rev:abc=" -> "cba"
Rotate = LetterTask("rotate", "rot:", lambda s: s[1:] + s[:1])  # "rot:abc=" -> "bca": first letter to the end


DOMAINS: dict[str, TaskFamily] = {family.name: family for family in (Arithmetic(), Sort, Reverse, Rotate)}


def family(domain: str) -> TaskFamily:
    try:
        return DOMAINS[domain]
    except KeyError:
        raise ValueError(f"unknown domain {domain!r}; known domains: {', '.join(sorted(DOMAINS))}") from None


def generate(domain: str, n: int, seed: int, level: str = "standard") -> list[Row]:
    """`n` rows of one domain; a private Random keeps the rows a function of the seed alone."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; levels: {', '.join(LEVELS)}")
    task = family(domain)
    rng = random.Random(f"{domain}:{seed}")  # the domain in the seed keeps families from sharing a stream
    return [task.make(rng, level) for _ in range(n)]


def write_jsonl(rows: list[Row], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def score(domain: str, prompt: str, response: str) -> float:
    """Verifiable reward: 1.0 for the exact answer, else 0.0."""
    return 1.0 if family(domain).check(prompt, response) else 0.0

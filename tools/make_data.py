"""Write the synthetic verifiable tasks as training data, with the tokenizer for them; no downloads.

    python tools/make_data.py --kind pretrain --out data/synthetic
    python tools/make_data.py --kind sft --out data/synthetic_sft --domains arithmetic,sort --n 500

Writes OUT/train.jsonl, OUT/eval/eval.jsonl (held-out prompts, none of them in train.jsonl; in
a subdirectory so data.path=OUT never trains on it) and OUT/tokenizer/. `--n` rows per domain; domains are interleaved at random (seeded). Every row
keeps `domain`, `prompt` and `answer` for checking with tasks.score; SFT rows add `response`
(the answer), pretrain rows add `text` (prompt + answer: "12+3=15", the prompt's '=' already
separates them).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from mimo_train.data.tasks import DOMAINS, generate, write_jsonl
from mimo_train.data.tokenizer import build_tokenizer


def rows_for(kind: str, rows: list[dict]) -> list[dict]:
    extra = (lambda r: {"response": r["answer"]}) if kind == "sft" else (lambda r: {"text": r["prompt"] + r["answer"]})
    return [{**r, **extra(r)} for r in rows]


def make(out: str | Path, kind: str = "pretrain", domains: list[str] | None = None, n: int = 2000,
         n_eval: int = 100, seed: int = 0, level: str = "standard") -> dict:
    """Write the files; returns a summary (also printed by the command line)."""
    domains = domains or sorted(DOMAINS)
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown:
        raise SystemExit(f"unknown domain(s) {unknown}; known: {', '.join(sorted(DOMAINS))}")
    if kind not in ("pretrain", "sft"):
        raise SystemExit(f"--kind must be pretrain or sft, not {kind!r}")
    out = Path(out)
    train, held_out = [], []
    for domain in domains:
        rows = generate(domain, n + n_eval, seed, level)
        train += rows[:n]
        seen = {r["prompt"] for r in rows[:n]}
        # Held-out prompts must not appear in training: the eval then measures generalisation.
        held_out += [r for r in rows[n:] if r["prompt"] not in seen]
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(held_out)
    write_jsonl(rows_for(kind, train), out / "train.jsonl")
    write_jsonl(rows_for(kind, held_out), out / "eval" / "eval.jsonl")
    build_tokenizer(out / "tokenizer")
    return {"out": str(out), "kind": kind, "level": level, "domains": domains, "train": str(out / "train.jsonl"),
            "eval": str(out / "eval" / "eval.jsonl"), "tokenizer": str(out / "tokenizer"),
            "train_rows": len(train), "eval_rows": len(held_out)}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--kind", default="pretrain", choices=["pretrain", "sft"])
    parser.add_argument("--domains", default=",".join(sorted(DOMAINS)), help=f"comma list of {sorted(DOMAINS)}")
    parser.add_argument("--n", type=int, default=2000, help="training rows per domain")
    parser.add_argument("--n-eval", type=int, default=100, help="held-out rows per domain (before de-duplication)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--level", default="standard", choices=["standard", "easy"],
                        help="operand sizes: standard (1-3 digits, 3-6 letters) or easy (1-2 digits, 3 letters)")
    args = parser.parse_args(argv)
    summary = make(args.out, args.kind, [d for d in args.domains.split(",") if d], args.n, args.n_eval, args.seed, args.level)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])

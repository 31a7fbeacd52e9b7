"""Score checkpoints on held-out prompts of every domain with the exact checkers; print a table.

    python tools/evaluate.py --model base=runs/demo/pretrain/checkpoints \\
        --model student=runs/demo/mopd/checkpoints --data runs/demo/data --out runs/demo/eval

A model is a training checkpoint dir (with `latest`, or one iter_* dir) or a serving dir (what
tools/export.py writes; a block-FP8 dir, from --fp8, is dequantised on load). --data is a
make_data output dir (its eval/eval.jsonl is used), an eval/ dir, or a .jsonl file of rows
with `domain` and `prompt`. Models are loaded one at a time. Writes OUT/results.json,
OUT/table.md and OUT/eval.png; bad input prints one `error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mimo_train.rl.evaluate import (OVERALL, EvalError, evaluate, format_table, limit_rows,  # noqa: E402
                                    load_eval_rows, prompt_ids, write_report)


def parse_models(specs: list[str]) -> dict[str, Path]:
    """NAME=PATH (or a bare PATH, named by its last component) -> {name: path}; every path must exist."""
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not name or not path:
            raise EvalError(f"--model {spec!r}: expected NAME=PATH")
        if name in models:
            raise EvalError(f"--model: the name {name!r} is given twice; names label the table's rows")
        if not Path(path).exists():
            raise FileNotFoundError(f"--model {name}={path}: no such checkpoint or serving directory")
        models[name] = Path(path)
    return models


def eval_file(data: str | Path) -> Path:
    """The eval .jsonl that --data stands for."""
    data = Path(data)
    if data.is_file():
        return data
    for candidate in (data / "eval" / "eval.jsonl", data / "eval.jsonl"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"--data {data}: expected a .jsonl file, or a directory holding eval/eval.jsonl "
                            "or eval.jsonl (python tools/make_data.py --out DIR writes DIR/eval/eval.jsonl)")


def tokenizer_for(name: str, recorded: Path | None, override: str | None):
    """--tokenizer if given, else the tokenizer directory recorded with the weights."""
    from mimo_train.data.dataset import load_tokenizer

    directory = override or recorded
    if directory is None:
        raise EvalError(f"model {name!r} records no tokenizer; pass --tokenizer DIR (e.g. the data's tokenizer/)")
    if not Path(directory).is_dir():
        source = "--tokenizer" if override else f"the tokenizer recorded with model {name!r}"
        raise FileNotFoundError(f"{source} ({directory}) is not a directory; pass --tokenizer DIR")
    return load_tokenizer(str(directory))


def score_model(name: str, path: Path, rows: list[dict], args) -> dict[str, float]:
    """Load one model, evaluate it, and free it before the next one is loaded."""
    import torch
    from tqdm import tqdm

    from mimo_train.rl.policy_io import read_policy
    from mimo_train.rollout.engine import Engine, EngineConfig

    policy = read_policy(path)
    tokenizer = tokenizer_for(name, policy.tokenizer, args.tokenizer)
    if len(tokenizer) > policy.config.vocab_size:
        raise EvalError(f"model {name!r} has a vocabulary of {policy.config.vocab_size} tokens, its tokenizer "
                        f"{tokenizer.name_or_path} has {len(tokenizer)}: not the tokenizer it was trained with")
    # The KV cache is sized for the longest prompt plus the answer, not the model's full context.
    longest = max(len(prompt_ids(tokenizer, r["prompt"])) for r in rows)
    engine = Engine(policy.config, policy.weights, EngineConfig(
        max_batch=min(args.batch_size, len(rows)), max_len=longest + args.max_new_tokens + 1, device=args.device))
    del policy
    try:
        with tqdm(total=len(rows), desc=name, unit="prompt", disable=args.no_progress, file=sys.stderr) as bar:
            return evaluate(engine, tokenizer, rows, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            progress=bar.update)
    finally:
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run(args) -> dict:
    if min(args.max_new_tokens, args.batch_size, args.threads or 1) < 1 or (args.limit is not None and args.limit < 1):
        raise EvalError("--max-new-tokens, --batch-size, --threads and --limit must be >= 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # Every input is checked before the first (slow) model load.
    models = parse_models(args.model)
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer} is not a directory")
    source = eval_file(args.data)
    rows = limit_rows(load_eval_rows(source), args.limit)
    counts = {d: sum(r["domain"] == d for r in rows) for d in sorted({r["domain"] for r in rows})}
    print(f"{len(rows)} prompts from {source}: " + ", ".join(f"{d} {n}" for d, n in counts.items()), flush=True)
    results, seconds = {}, {}
    for name, path in models.items():
        start = time.time()
        results[name] = score_model(name, path, rows, args)
        seconds[name] = round(time.time() - start, 2)
        print(f"{name}: overall {results[name][OVERALL]:.3f} ({seconds[name]:.1f} s)", flush=True)
    table = format_table(results)
    files = write_report(results, args.out, extra={
        "data": str(source), "rows": counts, "seconds": seconds, "max_new_tokens": args.max_new_tokens,
        "models": {n: str(p) for n, p in models.items()}})
    print(table, flush=True)
    print(f"report: {files['table']}, {files['plot']}, {files['json']}", flush=True)
    return {"results": results, "table": table, "files": files, "rows": counts, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="a checkpoint or serving dir to score, labelled NAME in the table (repeatable)")
    p.add_argument("--data", required=True, help="make_data output dir, its eval/ dir, or an eval .jsonl file")
    p.add_argument("--tokenizer", help="tokenizer dir (default: the one recorded with each model)")
    p.add_argument("--limit", type=int, default=None, help="at most N prompts per domain (the file's first N)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest answer generated")
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded together")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 decodes a small model fastest on a busy machine, "
                        "where OpenMP threads spin-wait for each other on every tiny op")
    p.add_argument("--out", default="runs/eval", help="report directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        return run(args)
    except (OSError, ValueError) as err:  # EvalError, ConvertError and bad prompts are ValueErrors
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line, whatever the message
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])

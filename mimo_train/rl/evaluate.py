"""Score policies on held-out prompts of every domain with the exact checkers; tables and plots.

    rows = load_eval_rows("data/synthetic/eval/eval.jsonl")
    results = {"base": evaluate(engine, tokenizer, rows)}      # {domain: accuracy, ..., "overall": ...}
    write_report(results, "runs/eval")                          # results.json, table.md, eval.png

A prompt is asked exactly as training showed it: bos + prompt tokens (the data pipeline's
`sft_document` / `pretrain_document` head, and the RL loop's rollout prompt); the model answers
and ends with eos, as every training document ends. Decoding is greedy, so a score is a
property of the weights alone.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable

from mimo_train.data.tasks import DOMAINS, family
from mimo_train.data.tokenizer import encode

FIELDS = ("domain", "prompt")
OVERALL = "overall"  # key of the accuracy over every row (micro-average) in evaluate's result
MEAN = "mean"  # column of the table: the mean of the per-domain accuracies (macro-average)


class EvalError(ValueError):
    """Bad evaluation input (data rows, tokenizer); the message names what to fix."""


def load_eval_rows(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file, each with a known `domain` and a `prompt` of that domain.

    Any malformed row is an error naming the file, the 1-based line and the field: a silently
    skipped row would change the denominator of every accuracy."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation data at {path}: expected a .jsonl file of rows with "
                                "`domain` and `prompt` (tools/make_data.py writes OUT/eval/eval.jsonl)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise EvalError(f"{where}: not a JSON object (got {type(row).__name__})")
            for name in FIELDS:
                if not isinstance(row.get(name), str) or not row[name]:
                    problem = "is missing" if name not in row else f"is not a non-empty string ({row[name]!r})"
                    raise EvalError(f"{where}: field {name!r} {problem}; evaluation rows need "
                                    f"{' and '.join(map(repr, FIELDS))}")
            if row["domain"] not in DOMAINS:
                raise EvalError(f"{where}: unknown domain {row['domain']!r}; "
                                f"known domains: {', '.join(sorted(DOMAINS))}")
            try:  # the checker recomputes the answer from the prompt, so the prompt must parse
                family(row["domain"]).check(row["prompt"], "")
            except ValueError as err:
                raise EvalError(f"{where}: {err} (domain {row['domain']!r})") from None
            rows.append(row)
    if not rows:
        raise EvalError(f"{path} holds no rows")
    return rows


def limit_rows(rows: list[dict], per_domain: int | None) -> list[dict]:
    """The first `per_domain` rows of each domain, in file order (None: all)."""
    if per_domain is None:
        return list(rows)
    seen: Counter = Counter()
    out = []
    for row in rows:
        if seen[row["domain"]] < per_domain:
            seen[row["domain"]] += 1
            out.append(row)
    return out


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt as the training documents begin: bos, then the prompt's characters."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + encode(tokenizer, prompt)


def response_text(tokenizer, tokens: list[int]) -> str:
    """The answer text: the tokens before the first eos, decoded with nothing dropped.

    Special tokens and ids beyond the tokenizer's vocabulary (a model's vocabulary may be
    padded) decode to visible markers rather than vanishing, so a response is credited only
    for the exact characters the model produced."""
    eos = tokenizer.eos_token_id
    if eos in tokens:
        tokens = tokens[:tokens.index(eos)]
    size = len(tokenizer)
    tokens = [t if 0 <= t < size else tokenizer.unk_token_id for t in tokens]
    return tokenizer.decode(tokens, skip_special_tokens=False)


def evaluate(engine, tokenizer, rows: list[dict], *, max_new_tokens: int = 16, batch_size: int = 32,
             progress: Callable[[int], object] | None = None) -> dict[str, float]:
    """Greedy-decode every row's prompt and check the answer: {domain: accuracy, "overall": accuracy}.

    `progress(n)` is called after each batch with the number of rows it finished (a tqdm's
    `update`). Domains are those present in `rows`."""
    from mimo_train.rollout.api import SamplingParams

    if not rows:
        raise EvalError("no rows to evaluate")
    if tokenizer.eos_token_id is None:
        raise EvalError(f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos token: "
                        "answers end with eos in training, so generation could not tell where one ends")
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,))
    correct: Counter = Counter()
    total: Counter = Counter()
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        completions, _ = engine.generate([prompt_ids(tokenizer, r["prompt"]) for r in batch], params)
        for c in completions:
            row = batch[c.prompt_index]
            total[row["domain"]] += 1
            correct[row["domain"]] += family(row["domain"]).check(row["prompt"], response_text(tokenizer, c.tokens))
        if progress is not None:
            progress(len(batch))
    result = {d: correct[d] / total[d] for d in sorted(total)}
    result[OVERALL] = sum(correct.values()) / sum(total.values())
    return result


def _columns(results: dict[str, dict[str, float]]) -> list[str]:
    return sorted({d for accs in results.values() for d in accs if d not in (OVERALL, MEAN)})


def _mean(accs: dict[str, float], domains: list[str]) -> float | None:
    present = [accs[d] for d in domains if d in accs]
    return sum(present) / len(present) if present else None


def table_rows(results: dict[str, dict[str, float]]) -> tuple[list[str], list[list[float | None]]]:
    """Column names (domains, then mean) and each model's values (None where not evaluated)."""
    domains = _columns(results)
    return domains + [MEAN], [[accs.get(d) for d in domains] + [_mean(accs, domains)] for accs in results.values()]


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per model, one column per domain plus the mean over domains."""
    columns, values = table_rows(results)
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in zip(results, values):
        cells = ["-" if v is None else f"{v:.3f}" for v in row]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_table(results: dict[str, dict[str, float]], png_path: str | Path) -> Path:
    """A heatmap of the table (models x domains + mean) with each accuracy written in its cell."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt
    import numpy as np

    columns, values = table_rows(results)
    grid = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    fig, ax = plt.subplots(figsize=(1.4 * len(columns) + 2.5, 0.55 * len(results) + 1.6))
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(results)), list(results))
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            # Dark text on the bright end of viridis, light text on the dark end.
            ax.text(j, i, "-" if v is None else f"{v:.2f}", ha="center", va="center",
                    color="black" if v is None or v > 0.6 else "white")
    ax.axvline(len(columns) - 1.5, color="white", linewidth=2)  # set the mean apart from the domains
    ax.set_title("accuracy on held-out prompts (greedy)")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def write_report(results: dict[str, dict[str, float]], out_dir: str | Path, *, extra: dict | None = None) -> dict:
    """results.json (with `extra`, e.g. row counts), table.md and eval.png under `out_dir`;
    returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "results.json", "table": out / "table.md", "plot": out / "eval.png"}
    files["json"].write_text(json.dumps({"results": results, **(extra or {})}, indent=2) + "\n", encoding="utf-8")
    files["table"].write_text(format_table(results), encoding="utf-8")
    plot_table(results, files["plot"])
    return {k: str(v) for k, v in files.items()}

"""The accept-length law as a check: per prompt, the target's next-token entropy H against the
MTP accept length at depth K, fitted to accept_len = (K+1) (1 - a H^b) and compared with the
MiMo-V2-Flash report's curve (a = b = 0.58; 4 (1 - 0.58 H^0.58) at K = 3).

    python tools/accept_law.py --model export/student --prompts runs/demo/data/eval/eval.jsonl \\
        [--tokenizer DIR] [--limit 32] [--depth 3] [--temperature 1.0] [--max-new-tokens 64] \\
        [--samples 4] [--seed 0] [--out runs/accept_law] [--no-plot]

--model is a serving directory (tools/export.py's output, block-FP8 ones too); --prompts a
JSON-lines file of evaluation rows (`domain` and `prompt`, as tools/make_data.py writes
OUT/eval/eval.jsonl), asked as training showed them (bos + characters, `prompt_ids`);
--tokenizer defaults to the one exported beside the weights.

What is measured, per prompt (the law is stated per sequence: a prompt whose continuation is
easy to predict drafts well, so pooling prompts first would leave one point and nothing to fit):

- accept length: our engine samples `--samples` completions at depth K (`Engine.generate(...,
  depth=K)`: K MTP drafts per verify step, speculative rejection sampling); each Completion's
  `drafts` counts its verify steps and the tokens they handed it, counting only tokens that
  reached it (a draft accepted past a stop token is not). accept_len = tokens / verify steps
  over the prompt's samples, in [1, K+1]. The first token of a sample comes from the prefill,
  not a verify step, so it is in neither count. A prompt whose samples all stopped at their
  first token has no verify step: it is listed with accept_length null and left out of the fit.
- H: the mean, over every position whose token a sample generated (all of its tokens, the first
  and a final stop token included; all samples of the prompt pooled), of the entropy in nats of
  the target's next-token distribution at temperature 1 (softmax of the main head's logits,
  whatever --temperature sampled with). The logits come from one teacher-forced forward over
  prompt + completion through the engine's own forward code (rollout/model.py InferenceModel)
  on the engine's own weight tensors, in the engine's dtype: the very model that verified the
  drafts, so H is the target's and no second copy of the weights (transformers, load_hf) can
  differ from it. It runs in a cache of its own, so the engine's state is untouched.

Fit: least squares of accept_len = (K+1) (1 - a H^b) over the prompts, a and b free (b > 0).
For a fixed b the model is linear in a, so a has a closed form and only b is searched: a log
grid of 400 values over [0.01, 10], then golden-section refinement between the best grid
point's neighbours. Reported: a, b, R^2 and the mean absolute error of the fit, whether b sits
at the edge of that range (then the points, e.g. all at about one H, do not determine it), and
R^2 and mean absolute error of the report's fixed curve on the same points.

One JSON object is printed and written to OUT/accept_law.json with where it ran
(tools/bench_env.environment: device, dtype, versions, commit) and the command; OUT/accept_law.png
plots the points, the fit and the report's curve (when matplotlib is importable). Bad input
prints one `accept_law: error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.bench_env import environment  # noqa: E402

REPORT_A = REPORT_B = 0.58  # the MiMo-V2-Flash report's accept_len = 4 (1 - 0.58 H^0.58), K = 3
B_RANGE = (0.01, 10.0)  # exponents searched by the fit


class LawError(ValueError):
    """Bad input to the tool; the message names the problem and the fix."""


# ---- measurement --------------------------------------------------------------------------
@dataclass
class Point:
    """One prompt's measurement."""

    prompt_index: int
    entropy: float  # H, nats: mean over the generated positions of its samples
    accept_length: float | None  # tokens per verify step over its samples; None without any step
    tokens: int  # generated tokens over its samples (the positions H averages)
    steps: int  # verify steps over its samples


class TargetScorer:
    """Teacher-forced forwards of the engine's main model: its weight tensors and forward code,
    a one-row cache of its own (prefill mode: every position attends within the block, as a
    prompt's prefill does)."""

    def __init__(self, engine):
        from mimo_train.rollout.cache import KVCache
        from mimo_train.rollout.model import InferenceModel

        cache = KVCache(engine.cfg, max_batch=1, max_len=engine.max_len, max_depth=0, mtp_layers=0,
                        device=engine.device, dtype=engine.dtype)
        self.device, self.max_len = engine.device, engine.max_len
        self.model = InferenceModel(engine.cfg, engine.w, cache)

    @torch.inference_mode()
    def entropies(self, prompt: list[int], tokens: list[int]) -> torch.Tensor:
        """[len(tokens)] float64: entropy (nats) of the next-token distribution at temperature 1
        at each position whose token was generated (the logits at position len(prompt) - 1 + i
        predict tokens[i])."""
        seq = prompt + tokens
        if len(seq) > self.max_len:
            raise LawError(f"prompt + completion of {len(seq)} tokens exceeds the engine's length {self.max_len}")
        ids = torch.tensor([seq], device=self.device)
        pos = torch.arange(len(seq), device=self.device)[None]
        self.model.cache.reset_rows(slice(0, 1))
        h = self.model.forward(ids, self.model.slots(slice(0, 1), pos, prefill=True))
        logits = self.model.logits(h[0, len(prompt) - 1:len(seq) - 1]).double()
        logp = logits.log_softmax(-1)
        return -(logp.exp() * logp).sum(-1)


def points_of(completions, scorer: TargetScorer) -> list[Point]:
    """One Point per prompt of a generate() call's completions (see the module docstring)."""
    from mimo_train.rollout.api import DraftCounts

    by_prompt: dict[int, list] = {}
    for c in completions:
        by_prompt.setdefault(c.prompt_index, []).append(c)
    points = []
    for i, samples in sorted(by_prompt.items()):
        drafts = DraftCounts.total([c.drafts for c in samples])
        h = torch.cat([scorer.entropies(c.prompt, c.tokens) for c in samples])
        points.append(Point(i, float(h.mean()), drafts.accept_length, len(h), drafts.steps))
    return points


# ---- the law and its fit ------------------------------------------------------------------
def law(entropy, a: float, b: float, depth: int):
    """accept_len = (K+1) (1 - a H^b)."""
    return (depth + 1) * (1 - a * np.power(np.asarray(entropy, dtype=np.float64), b))


def goodness(entropy, accept, a: float, b: float, depth: int) -> dict:
    """R^2 (None when every accept length is the same) and mean absolute error of a curve."""
    y = np.asarray(accept, dtype=np.float64)
    residual = y - law(entropy, a, b, depth)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float((residual ** 2).sum()) / total if total > 0 else None
    return {"r2": r2, "mae": float(np.abs(residual).mean())}


def _best_a(x: np.ndarray, z: np.ndarray) -> float:
    """argmin_a sum (a x - z)^2."""
    xx = float(x @ x)
    return float(x @ z) / xx if xx > 0 else 0.0


def fit_law(entropy, accept, depth: int) -> dict:
    """Least squares of accept_len = (K+1) (1 - a H^b) over the points: {a, b, r2, mae}.

    The residual is (K+1) (a H^b - z) with z = 1 - accept_len / (K+1), so for each b the best
    a is a projection; b is found on a log grid over B_RANGE and refined by golden section
    between the grid neighbours of the best grid point."""
    H = np.asarray(entropy, dtype=np.float64)
    y = np.asarray(accept, dtype=np.float64)
    if len(H) < 3 or np.count_nonzero(H > 0) < 2:
        raise LawError(f"the fit needs at least 3 prompts with verify steps, 2 of them with H > 0; got {len(H)} "
                       "(use more prompts: --limit, or longer answers: --max-new-tokens)")
    z = 1 - y / (depth + 1)

    def sse(b: float) -> float:
        x = np.power(H, b)
        return float(((_best_a(x, z) * x - z) ** 2).sum())

    grid = np.geomspace(*B_RANGE, 400)
    costs = [sse(b) for b in grid]
    i = int(np.argmin(costs))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):  # the bracket shrinks by 0.618 each round: far below float precision
        m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if sse(m1) <= sse(m2):
            hi = m2
        else:
            lo = m1
    b = (lo + hi) / 2
    a = _best_a(np.power(H, b), z)
    # A minimum at the edge of the range: the points do not pin b down (e.g. every prompt at
    # about the same H), and a, b are then no measurement of the law.
    at_bound = bool(min(b / B_RANGE[0], B_RANGE[1] / b) < 1.05)
    return {"a": a, "b": b, **goodness(H, y, a, b, depth), "b_at_search_bound": at_bound}


# ---- output ---------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> Path | None:
    """Scatter of (H, accept_len), the fitted curve and the report's; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("accept_law: matplotlib is not installed: no plot (the JSON has every number)", file=sys.stderr)
        return None
    K, fit = result["depth"], result["fit"]
    used = [p for p in result["points"] if p["accept_length"] is not None]
    H = np.array([p["entropy"] for p in used])
    grid = np.linspace(0, max(float(H.max()) * 1.05, 0.1), 200)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter(H, [p["accept_length"] for p in used], s=16, alpha=0.7, label="prompts")
    r2 = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    ax.plot(grid, law(grid, fit["a"], fit["b"], K), label=f"fit: {K + 1}(1 - {fit['a']:.3f} H^{fit['b']:.3f})")
    ax.plot(grid, law(grid, REPORT_A, REPORT_B, K), "--",
            label=f"report: {K + 1}(1 - 0.58 H^0.58), R^2 {r2(result['report_curve']['r2'])}")
    ax.set_xlabel("H: mean next-token entropy of the target (nats)")
    ax.set_ylabel(f"accept length (tokens per verify step, K={K})")
    ax.set_ylim(0.9, K + 1.1)
    ax.set_title(f"K={K}, n={len(used)}: a={fit['a']:.3f}, b={fit['b']:.3f}, R^2={r2(fit['r2'])}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args) -> dict:
    from mimo_train.data.dataset import load_tokenizer
    from mimo_train.rl.evaluate import load_eval_rows, prompt_ids
    from mimo_train.rollout.api import SamplingParams
    from mimo_train.rollout.engine import Engine, EngineConfig

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise LawError(f"--model {model}: no serving directory there (config.json missing); "
                       "pass what tools/export.py --out wrote")
    if args.limit is not None and args.limit < 1:
        raise LawError(f"--limit must be >= 1, got {args.limit}")
    if args.samples < 1 or args.max_new_tokens < 1:
        raise LawError(f"--samples and --max-new-tokens must be >= 1, got {args.samples} and {args.max_new_tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else model
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise LawError(f"no tokenizer in {tokenizer_dir}: pass --tokenizer DIR (the data's tokenizer/)"
                       if not args.tokenizer else f"--tokenizer {tokenizer_dir}: no tokenizer_config.json there")
    rows = load_eval_rows(args.prompts)[:args.limit]
    tokenizer = load_tokenizer(str(tokenizer_dir))
    prompts = [prompt_ids(tokenizer, r["prompt"]) for r in rows]

    # The cache is sized for the longest prompt plus its answer, not the model's full context.
    engine = Engine.from_pretrained(model, EngineConfig(
        max_batch=min(16, len(prompts) * args.samples), max_len=max(map(len, prompts)) + args.max_new_tokens + 1,
        device=args.device, seed=args.seed))
    if engine.max_depth == 0:
        raise LawError(f"--model {model} has no MTP layers: there is no draft to accept")
    depth = engine.max_depth if args.depth is None else args.depth
    if not 1 <= depth <= engine.max_depth:
        raise LawError(f"--depth {depth} is outside [1, {engine.max_depth}] (the model's MTP layers); "
                       f"use --depth {engine.max_depth} or less")
    if len(tokenizer) > engine.cfg.vocab_size:
        raise LawError(f"the tokenizer ({len(tokenizer)} tokens) is larger than the model's vocabulary "
                       f"({engine.cfg.vocab_size}): not the tokenizer it was trained with; pass --tokenizer")
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, n=args.samples,
                            stop_token_ids=(tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else (),
                            seed=args.seed)
    completions, _ = engine.generate(prompts, params, depth=depth)
    points = points_of(completions, TargetScorer(engine))
    used = [p for p in points if p.accept_length is not None]
    H, accept = [p.entropy for p in used], [p.accept_length for p in used]
    fit = fit_law(H, accept, depth)
    out = Path(args.out)
    result = {
        "law": "accept_len = (K+1) (1 - a H^b), H in nats (mean next-token entropy of the target at T=1)",
        "model": str(model), "prompts": str(args.prompts), "depth": depth, "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens, "samples_per_prompt": args.samples, "seed": args.seed,
        "n": len(used), "skipped_without_verify_steps": len(points) - len(used),
        "fit": fit, "report_curve": {"a": REPORT_A, "b": REPORT_B, **goodness(H, accept, REPORT_A, REPORT_B, depth)},
        "mean_entropy": float(np.mean(H)), "mean_accept_length": float(np.mean(accept)),
        "points": [asdict(p) for p in points],
        **environment(engine.device, engine.dtype),
        "command": "python tools/accept_law.py " + shlex.join(args.argv),
    }
    out.mkdir(parents=True, exist_ok=True)
    result["files"] = {"json": str(out / "accept_law.json")}
    if not args.no_plot and (png := plot(result, out / "accept_law.png")):
        result["files"]["png"] = str(png)
    tmp = out / "accept_law.json.tmp"  # a reader never sees half a file
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out / "accept_law.json")
    return result


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="serving directory (tools/export.py --out)")
    p.add_argument("--prompts", required=True, help="JSON-lines rows with `domain` and `prompt` (eval/eval.jsonl)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one exported with the model)")
    p.add_argument("--limit", type=int, default=None, help="the file's first N prompts")
    p.add_argument("--depth", type=int, default=None, help="K drafts per verify step (default: every MTP layer)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (H is always at T=1)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest sample (samples stop at eos)")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt, pooled into its point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest for a small model "
                                                             "on a busy machine)")
    p.add_argument("--out", default="runs/accept_law", help="directory for accept_law.json and accept_law.png")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    args = p.parse_args(argv)
    args.argv = argv
    try:
        result = run(args)
    except (OSError, ValueError) as err:  # LawError, EvalError and the engine's input errors are ValueErrors
        print("accept_law: error: " + " ".join(str(err).split()), file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")  # megatron-core's import-time notes about Apex / Transformer Engine
    main()

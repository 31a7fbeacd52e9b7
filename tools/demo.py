"""The demo, end to end on synthetic verifiable tasks, on 2 CPU cores:

    base (SFT of the `small` model with 3 MTP layers on every domain)
      -> one GRPO teacher per domain (from the base)
      -> MOPD student (from the base, every teacher scoring its own domain's prompts)
      -> evaluation table (base, each teacher, the student; every domain)
      -> export of the student to the serving format -> MTP accept length in our engine

    make demo        (or: python tools/demo.py [out=runs/demo] [base_steps=..] [teacher_steps=..] [mopd_steps=..]
                      [model=small] [eval_limit=N])

Every stage is the recipe a user would run (`mimo_train/run.py recipe=sft|grpo|mopd`), so
each stage's checkpoints, metrics.jsonl and plots are under <out>/<stage>. Nothing is
downloaded: data and tokenizer come from the task generators. The results also go to
<out>/report.md with the plots.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Letter tasks that `small` half-learns in the base's few minutes (greedy 33-48% held-out after
# 80 steps in the run of docs/experiments.md), so RL has reward to work with and room above the
# base. Two-digit arithmetic is barely learnt in that budget, which leaves a teacher no gain to
# show, so it is left out of the demo (it stays a domain of the task generators).
DOMAINS = ["reverse", "rotate", "sort"]
# model and eval_limit (held-out prompts per domain) exist for a quick look and the smoke test
# (tests/rl/test_demo.py runs the pipeline on `tiny`); the README's table is for `small`.
DEFAULTS = {"out": "runs/demo", "base_steps": "80", "teacher_steps": "12", "mopd_steps": "72", "seed": "0",
            "level": "easy", "model": "small", "eval_limit": ""}


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(console, title: str, argv: list[str]) -> float:
    from mimo_train.run import main as run

    run_dir = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("logging.run_dir=")))
    _claim_stage(run_dir, argv)
    console.rule(f"[bold]{title}")
    console.print("python mimo_train/run.py " + " ".join(argv), style="dim", soft_wrap=True, markup=False)
    start = time.time()
    if run(argv):
        raise SystemExit(f"demo: stage {title!r} failed")
    return time.time() - start


def _claim_stage(run_dir: Path, argv: list[str]) -> None:
    """A stage rerun resumes from its last checkpoint, so that an interrupted demo continues. A
    run made with other settings (other arguments, another version of the demo) must not be
    continued as if it were this one: each stage records its arguments, and a mismatch stops
    the demo before any work, naming the directory."""
    record = run_dir / "demo_stage.json"
    if record.exists():
        if json.loads(record.read_text()) == argv:
            return
        why = "was made with other settings than this demo's"
    elif (run_dir / "checkpoints").exists():
        why = "holds checkpoints this demo did not record making"
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(argv))
        return
    raise SystemExit(f"demo: {run_dir} {why} (it would be resumed as if it were this stage): "
                     f"remove {run_dir.parent} to start over, or pass out=<another directory>")


def _tokens(run_dir: Path, key: str) -> float:
    from mimo_train.training.tracking import read_metrics

    return float(sum(r.get(key, 0.0) for r in read_metrics(run_dir)))


def main(argv: list[str]) -> dict:
    malformed = [a for a in argv if "=" not in a]
    if malformed:
        raise SystemExit(f"demo: arguments are not key=value: {malformed}; keys: {sorted(DEFAULTS)}")
    given = dict(a.split("=", 1) for a in argv)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:  # a typo (mopd_step=120) would otherwise run the defaults for 14 minutes
        raise SystemExit(f"demo: unknown argument(s) {unknown}; use key=value with keys {sorted(DEFAULTS)}")
    args = {**DEFAULTS, **given}
    out = Path(args["out"])
    from rich.console import Console

    console = Console()
    t_start = time.time()
    data = out / "data"
    if not (data / "train.jsonl").exists():
        # 800 held-out draws per domain (about 660 after removing prompts seen in training; the
        # training rows do not depend on it): a standard error below 2 points per score (at most
        # 0.5 / sqrt(660) = 1.95), the size of the gaps the table is read for (5% of a teacher).
        summary = _tool("make_data").make(data, kind="sft", domains=DOMAINS, n=3000, n_eval=800, seed=0,
                                          level=args["level"])
        console.print(f"data: {summary['train_rows']} rows of {', '.join(summary['domains'])} in {data}")
    common = common_args(args, data)
    rl_common = rl_args(args, data)
    seconds, tokens = {}, {}

    base = out / "base"
    # lr 1e-3: in an earlier trial the 8-layer model sat on a plateau at 3e-3 and learnt the
    # tasks at 1e-3.
    seconds["base"] = _run(console, "1. base model: SFT on every domain (main + 3 MTP depths)", [
        "recipe=sft", *common, f"train.steps={args['base_steps']}", "train.global_batch=32", "train.micro_batch=32",
        "data.seq_len=64", "optim.lr=1e-3", "optim.min_lr=1e-4",
        f"optim.warmup_steps={min(10, int(args['base_steps']) // 8)}", f"logging.run_dir={base}"])
    tokens["base"] = float(int(args["base_steps"]) * 32 * 64)  # steps x global batch x packed sequence length
    console.print(depth_table(base, seconds["base"]))

    teachers = {}
    for d in DOMAINS:
        run_dir = out / f"teacher_{d}"
        seconds[f"teacher_{d}"] = _run(console, f"2. GRPO teacher for {d}", [
            "recipe=grpo", *rl_common, f"rl.domains=[{d}]", f"train.steps={args['teacher_steps']}",
            f"checkpoint.load={base}/checkpoints", f"logging.run_dir={run_dir}"])
        tokens[f"teacher_{d}"] = _tokens(run_dir, "rl/tokens")
        teachers[d] = run_dir / "checkpoints"

    student = out / "student"
    seconds["mopd"] = _run(console, "3. MOPD student from the base, one teacher per domain",
                           mopd_args(args, data, base, teachers, student))
    tokens["mopd"] = _tokens(student, "rl/tokens")

    console.rule("[bold]4. evaluation on held-out prompts (greedy, exact checkers)")
    models = {"base": base / "checkpoints", **{f"teacher_{d}": teachers[d] for d in DOMAINS},
              "student": student / "checkpoints"}
    evaluation = _tool("evaluate").main([*[f"--model={n}={p}" for n, p in models.items()], f"--data={data}",
                                         "--max-new-tokens=8", f"--out={out / 'eval'}",
                                         *([f"--limit={args['eval_limit']}"] if args["eval_limit"] else [])])
    results = evaluation.get("results", evaluation)

    console.rule("[bold]5. export of the student, and its MTP drafts in our engine")
    export_dir = out / "export"
    _tool("export").main(["--ckpt", str(student / "checkpoints"), "--out", str(export_dir), "--dtype", "fp32",
                          "--tokenizer", str(data / "tokenizer"), "--overwrite"])
    speculative = accept_lengths(export_dir, data)
    console.print(json.dumps(speculative))

    summary = {"results": results, "rows": evaluation.get("rows", {}), "seconds": seconds, "tokens": tokens,
               "speculative": speculative,
               "total_seconds": time.time() - t_start, "command": "python tools/demo.py " + " ".join(argv),
               "environment": run_environment()}
    report = write_report(out, summary)
    console.print(report.read_text(), markup=False)
    console.print(f"[bold]demo done in {summary['total_seconds'] / 60:.1f} min[/]: report {report}")
    return summary


def common_args(args: dict, data: Path) -> list[str]:
    return [f"model={args['model']}", f"data.path={data}/train.jsonl", f"data.tokenizer={data}/tokenizer",
            f"train.seed={args['seed']}", "logging.progress=true"]


def rl_args(args: dict, data: Path) -> list[str]:
    # Rollouts at temperature 0.5: at 1.0 the base's samples are right far less often than its
    # greedy answers, which leaves GRPO little reward to learn from.
    # One packed micro-batch per RL step: 128 samples of ~15 tokens fit in one, and fewer, larger
    # matmuls train faster on a CPU than four micro-batches with the same result.
    return [*common_args(args, data), f"rl.prompts={data}/train.jsonl", "rl.max_new_tokens=8", "rl.temperature=0.5",
            "train.micro_batch=128"]


def mopd_args(args: dict, data: Path, base: Path, teachers: dict[str, Path], run_dir: Path) -> list[str]:
    """The MOPD stage (tools/mopd_trial.py reruns it with overrides), chosen by the trials of
    docs/experiments.md ("MOPD settings"): 32 samples a step (16 prompts x 2) for 72 steps, half
    the three teachers' tokens; the exact (full-vocabulary) KL to the in-process teachers; and
    the outcome advantage added at alpha = 1, which carries the few answer-deciding tokens where
    the reverse teacher's lead sits (without it no setting brought the student within 0.95 of
    that teacher)."""
    listed = ",".join(f"{{name:{d},domain:{d},checkpoint:'{teachers[d]}'}}" for d in DOMAINS)
    return ["recipe=mopd", *rl_args(args, data), f"rl.teachers=[{listed}]", f"train.steps={args['mopd_steps']}",
            "rl.prompts_per_step=16", "train.global_batch=32", "train.micro_batch=32", "rl.distill_loss=full",
            "rl.alpha=1.0", f"checkpoint.load={base}/checkpoints", f"logging.run_dir={run_dir}"]


def run_environment() -> dict:
    """Where the figures come from (commit, device, threads, versions): two runs' tables can differ
    in the last digit across machines and commits, and the report must say which one it is."""
    import torch

    gpu = torch.cuda.is_available()
    return _tool("bench_env").environment("cuda" if gpu else "cpu", "bfloat16" if gpu else "float32")


def depth_table(run_dir: Path, seconds: float):
    """Loss and top-1 accuracy of each depth (main predicts t+1, mtp_k predicts t+1+k) over the run."""
    from rich.table import Table

    from mimo_train.training.tracking import read_metrics

    rows = read_metrics(run_dir)
    depths = ["main"] + sorted({k.removeprefix("acc/") for r in rows for k in r if k.startswith("acc/mtp_")})
    table = Table(title=f"base model, {rows[-1]['step']} steps in {seconds:.0f}s: per-depth loss and top-1 accuracy "
                        "on answer tokens (main predicts t+1, mtp_k predicts t+1+k)")
    table.add_column("step", justify="right")
    for d in depths:
        table.add_column(f"loss {d}", justify="right")
    for d in depths:
        table.add_column(f"acc {d}", justify="right")
    last = rows[-1]["step"]
    for row in rows:
        if row["step"] in {1, last} or row["step"] % max(1, last // 6) == 0:
            table.add_row(str(row["step"]), *[f"{row[f'loss/{d}']:.3f}" for d in depths],
                          *[f"{row[f'acc/{d}']:.2f}" for d in depths])
    return table


def accept_lengths(export_dir: Path, data: Path, n: int = 32, rounds: int = 3) -> dict:
    """Sample the student (temperature 1) on held-out prompts at K = 0, at K = 3 and with the
    depth chosen every step (rl.spec_depth=auto: measured step costs x running acceptance),
    the three interleaved `rounds` times so that a machine slowing down favours none of them.
    One torch thread: a 10M-parameter model decoding one request is a stream of small ops, which
    two threads on two cores run about half as fast (OpenMP hand-offs), and slower still when
    anything else runs."""
    with _tool("bench_env").torch_threads(1):
        return _accept_lengths(export_dir, data, n, rounds)


def _accept_lengths(export_dir: Path, data: Path, n: int, rounds: int) -> dict:
    from mimo_train.rollout.api import SamplingParams
    from mimo_train.rollout.engine import Engine, EngineConfig

    from mimo_train.data.dataset import load_tokenizer
    from mimo_train.rl.evaluate import load_eval_rows, prompt_ids

    # Two engines on the same weights: auto's sees only its own steps (as in an RL run), not
    # the fixed depths' costs and acceptance.
    fixed = Engine.from_pretrained(export_dir, EngineConfig(max_batch=1, max_len=128))
    auto = Engine.from_pretrained(export_dir, EngineConfig(max_batch=1, max_len=128, auto_depth=True))
    tokenizer = load_tokenizer(str(data / "tokenizer"))
    prompts = [prompt_ids(tokenizer, r["prompt"]) for r in load_eval_rows(data / "eval" / "eval.jsonl")[:n]]
    params = SamplingParams(temperature=1.0, max_new_tokens=16, stop_token_ids=(tokenizer.eos_token_id,), seed=0)
    modes = {"K=0": (fixed, 0), f"K={fixed.max_depth}": (fixed, fixed.max_depth), "auto": (auto, None)}
    names = list(modes)
    runs = {name: [] for name in modes}
    for r in range(rounds):  # the order rotates: no mode always runs first or last
        for name in names[r % len(names):] + names[:r % len(names)]:
            engine, depth = modes[name]
            runs[name].append(engine.generate(prompts, params, depth=depth)[1])
    out = {}
    for name, ms in runs.items():
        rates = [m.tokens_per_s for m in ms]
        steps = {}
        for m in ms:
            for k, v in m.depth_steps.items():
                steps[str(k)] = steps.get(str(k), 0) + v
        out[name] = {"tokens_per_s": round(sum(rates) / len(rates), 1), "rounds_tokens_per_s": [round(r, 1) for r in rates],
                     "last_round_accept_length": round(ms[-1].mean_accept_length, 3),
                     "last_round_acceptance_per_position": [round(a, 3) for a in ms[-1].acceptance_per_position],
                     "depth_steps_all_rounds": dict(sorted(steps.items()))}
    best = max(names[:2], key=lambda name: out[name]["tokens_per_s"])
    # The noise of the comparison: the largest spread of one mode's rate over the rounds; and
    # auto against the better fixed depth round by round (the rounds are interleaved, so a
    # machine slowing down in one round slows both).
    noise = max(max(r) - min(r) for r in ([m.tokens_per_s for m in ms] for ms in runs.values()))
    paired = [a.tokens_per_s / b.tokens_per_s for a, b in zip(runs["auto"], runs[best])]
    out["auto_vs_best"] = {"best_fixed": best, "ratio": round(out["auto"]["tokens_per_s"] / out[best]["tokens_per_s"], 3),
                           "ratio_per_round": [round(x, 3) for x in paired],
                           "round_spread_tokens_per_s": round(noise, 1),
                           "auto_within_noise": out["auto"]["tokens_per_s"] >= out[best]["tokens_per_s"] - noise,
                           "step_ms_at_start": {str(b): [round(t * 1e3, 3) for t in c] for b, c in auto.auto.measured.items()},
                           "step_ms_at_end": {str(b): [round(t * 1e3, 3) for t in c] for b, c in auto.auto.seconds.items()}}
    return out


def speculative_table(spec: dict) -> list[str]:
    """Tokens/s of K = 0, K = max and auto (mean of the interleaved rounds), and auto against
    the better fixed depth."""
    lines = ["Batch 1, one torch thread, temperature 1, at most 16 new tokens; auto on an engine of its own.", "",
             "| depth | tokens/s (mean of rounds) | rounds | accept length (last round) | steps at each K (all rounds) |",
             "|---|---|---|---|---|"]
    for name, m in spec.items():
        if name != "auto_vs_best":
            lines.append(f"| {name} | {m['tokens_per_s']} | {', '.join(map(str, m['rounds_tokens_per_s']))} | "
                         f"{m['last_round_accept_length']} | {m['depth_steps_all_rounds']} |")
    cmp = spec["auto_vs_best"]
    lines += ["", f"auto / {cmp['best_fixed']} = {cmp['ratio']} (per round {cmp['ratio_per_round']}; the rounds' largest "
                  f"spread: {cmp['round_spread_tokens_per_s']} tokens/s; auto within it: {cmp['auto_within_noise']})."]
    return lines


def write_report(out: Path, summary: dict) -> Path:
    from mimo_train.rl.evaluate import format_table

    results, seconds, tokens, env = summary["results"], summary["seconds"], summary["tokens"], summary["environment"]
    teacher_s = sum(v for k, v in seconds.items() if k.startswith("teacher_"))
    teacher_tok = sum(v for k, v in tokens.items() if k.startswith("teacher_"))
    lines = ["# mimo-train demo", "", "## Held-out accuracy (greedy, exact checkers)", "", format_table(results), "",
             "![evaluation](eval/eval.png)", "", "## Student vs each teacher on its own domain", "",
             "Each score is a mean over the domain's held-out prompts; +- is its standard error, "
             "sqrt(p (1 - p) / prompts).", "",
             "| domain | prompts | base | teacher | student | student / teacher |", "|---|---|---|---|---|---|"]
    rows = summary.get("rows", {})
    for d in DOMAINS:
        n = rows.get(d, 0)
        b, t, s = results["base"][d], results[f"teacher_{d}"][d], results["student"][d]
        se = (lambda p: f" +- {math.sqrt(p * (1 - p) / n):.3f}" if n else "")  # noqa: E731
        lines.append(f"| {d} | {n} | {b:.3f}{se(b)} | {t:.3f}{se(t)} | {s:.3f}{se(s)} | "
                     + (f"{s / t:.2f} |" if t else "- |"))
    lines += ["", "## Compute", "", "| stage | wall time (s) | tokens trained on |", "|---|---|---|",
              f"| base SFT | {seconds['base']:.0f} | {tokens['base']:.0f} |",
              *[f"| teacher {d} (GRPO) | {seconds[f'teacher_{d}']:.0f} | {tokens[f'teacher_{d}']:.0f} |" for d in DOMAINS],
              f"| all teachers | {teacher_s:.0f} | {teacher_tok:.0f} |",
              f"| MOPD student | {seconds['mopd']:.0f} | {tokens['mopd']:.0f} |",
              f"| MOPD / teachers | {seconds['mopd'] / max(teacher_s, 1e-9):.2f} | {tokens['mopd'] / max(teacher_tok, 1):.2f} |",
              "", "## Speculative decoding with the student's MTP layers (exported weights, our engine)", "",
              *speculative_table(summary["speculative"]), "",
              "```json", json.dumps(summary["speculative"], indent=1), "```", "",
              "## Curves", "", "![base losses](base/loss.png)", "",
              *[f"![teacher {d}](teacher_{d}/rewards.png)" for d in DOMAINS], "", "![student](student/rewards.png)", "",
              f"Total: {summary['total_seconds'] / 60:.1f} min.", "",
              (f"Run: `{summary['command'].strip()}` at commit {env['commit']} on {env['device']} "
               f"({env['cpu_count']} CPUs, {env['threads']} torch threads{', ' + env['gpu'] if 'gpu' in env else ''}), "
               f"torch {env['versions']['torch']}, megatron-core {env['versions']['megatron-core']}.")]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return path


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_MODE", "offline")
    main(sys.argv[1:])

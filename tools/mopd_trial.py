"""Rerun the demo's MOPD stage on its trained base and teachers with other settings, and score
the student the way the demo does: how the MOPD settings (rl.distill_loss, learning rate, steps
and samples per step) were chosen (docs/experiments.md).

    python tools/mopd_trial.py NAME [hydra overrides ...] [--demo runs/demo] [--out runs/mopd_trials]

Needs a finished `make demo` (its base, teachers, data and evaluation). Prints one JSON line
("RESULT {...}") and writes it to <out>/<NAME>/trial.json: the wall time and tokens of the MOPD
stage, their ratio to the three teachers' tokens, the student's held-out accuracy per domain
with its standard error, student / teacher on each teacher's own domain, and the last step's
per-domain KL metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("overrides", nargs="*", help="hydra overrides of the MOPD stage, e.g. rl.distill_loss=topk")
    parser.add_argument("--demo", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "mopd_trials")
    args = parser.parse_args(argv)
    demo, data = args.demo, args.demo / "data"
    summary_path = demo / "summary.json"
    if not summary_path.exists():
        raise SystemExit(f"mopd_trial: no finished demo at {demo} (no summary.json): run `make demo` first")
    from mimo_train.run import main as run
    from mimo_train.training.tracking import read_metrics
    from tools import demo as demo_tool
    from tools import evaluate
    from tools.bench_env import environment

    done = json.loads(summary_path.read_text())
    settings = {**demo_tool.DEFAULTS, **dict(a.split("=", 1) for a in done["command"].split()[2:] if "=" in a)}
    teachers = {d: demo / f"teacher_{d}" / "checkpoints" for d in demo_tool.DOMAINS}
    run_dir = args.out / args.name
    start = time.time()
    if run([*demo_tool.mopd_args(settings, data, demo / "base", teachers, run_dir), "logging.plot=false",
            "logging.progress=false", *args.overrides]):
        raise SystemExit(f"mopd_trial: the MOPD run {args.name!r} failed")
    seconds = time.time() - start
    rows = read_metrics(run_dir)
    tokens = sum(r.get("rl/tokens", 0.0) for r in rows)
    teacher_tokens = sum(done["tokens"][f"teacher_{d}"] for d in demo_tool.DOMAINS)
    evaluation = evaluate.main([f"--model=student={run_dir}/checkpoints", f"--data={data}",
                                         "--max-new-tokens=8", f"--out={run_dir}/eval", "--no-progress",
                                         *([f"--limit={settings['eval_limit']}"] if settings["eval_limit"] else [])])
    student, counts = evaluation["results"]["student"], evaluation["rows"]
    teacher = {d: done["results"][f"teacher_{d}"][d] for d in demo_tool.DOMAINS}
    trial = {
        "name": args.name, "overrides": args.overrides, "seconds": round(seconds, 1), "tokens": tokens,
        "tokens_vs_teachers": round(tokens / teacher_tokens, 3),
        "student": {d: round(student[d], 4) for d in demo_tool.DOMAINS},
        "standard_error": {d: round(math.sqrt(student[d] * (1 - student[d]) / counts[d]), 4) for d in demo_tool.DOMAINS},
        "student_vs_teacher": {d: round(student[d] / teacher[d], 3) if teacher[d] else None for d in demo_tool.DOMAINS},
        "last_step": {k: round(v, 4) for k, v in rows[-1].items() if k.startswith(("distill/kl/", "teacher_kl/"))},
        "commit": environment("cpu", "float32")["commit"],
    }
    (run_dir / "trial.json").write_text(json.dumps(trial, indent=1) + "\n")
    print("RESULT " + json.dumps(trial))
    return trial


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_MODE", "offline")
    main(sys.argv[1:])

"""One-shot GPU validation: the GPU test lane and the three benchmarks, one JSON report.

    python tools/gpu_check.py [--out gpu_check.json] [--budget-s 480]
    python tools/gpu_check.py --dry-run       # on any machine: plan, and rehearse on tiny settings

Meant for a machine lent for a short while (one H100/H200-class GPU, minutes): everything worth
knowing about this repository on a GPU comes from this one command, within --budget-s (8 minutes
by default). Stages, in order of importance, each in its own process with its own time limit
(cut to what is left of the budget; a stage that fails or runs out does not stop the next):

1. the GPU lane (`make test-gpu`'s tests: tests/kernels natively, tests/gpu), with a per-test
   result list (junit XML) in the report;
2. tools/bench_kernels.py at MiMo-V2-Flash shapes (attention, decode/verify, sampling);
3. tools/bench_rollout.py: a short --train-demo (the small preset learns the periodic copy task,
   so its MTP layers draft something), then our engine at K = 0..3 against transformers'
   generate, same device and dtype;
4. tools/bench_train.py: training-step throughput, ours vs transformers, same device and dtype.

The report: where it ran (tools/bench_env.py), and per stage the command, exit code, seconds,
whether it timed out, its JSON result (or the test counts and failures) and its output's tail.

--dry-run prints the plan and runs every stage on tiny settings that work on a CPU (the lane's
tests are only collected; the benchmarks run their smallest shapes): it checks the machinery,
and its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_env import ROOT, environment  # noqa: E402

TAIL = 3000


@dataclass
class Stage:
    name: str
    commands: list[list[str]]  # run one after another; the stage's result is parsed from the last
    timeout_s: int
    env: dict = field(default_factory=dict)
    junit: Path | None = None  # the lane: per-test results


def plan(work: Path, dry_run: bool) -> list[Stage]:
    py = sys.executable
    demo = work / "rollout_demo"
    junit = work / "lane.xml"
    lane = [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}", "tests/kernels",
            "tests/gpu"]
    if dry_run:
        return [
            Stage("gpu_lane", [lane + ["--collect-only"]], 300, {"MIMO_TEST_LANE": "gpu"}, junit),
            Stage("bench_kernels", [[py, "tools/bench_kernels.py", "--smoke"]], 300, {"TRITON_INTERPRET": "1"}),
            Stage("bench_rollout", [[py, "tools/bench_rollout.py", "--train-demo", str(demo), "--steps", "2"],
                                    [py, "tools/bench_rollout.py", "--model", str(demo), "--new-tokens", "4",
                                     "--batches", "1,2", "--depths", "0,1", "--rounds", "1", "--batch1-prompts", "1"]],
                  300),
            Stage("bench_train", [[py, "tools/bench_train.py", "--model", "tiny", "--seq", "32", "--batch", "2",
                                   "--steps", "1"]], 300),
        ]
    return [
        Stage("gpu_lane", [lane], 240, {"MIMO_TEST_LANE": "gpu"}, junit),
        Stage("bench_kernels", [[py, "tools/bench_kernels.py"]], 120),
        Stage("bench_rollout", [[py, "tools/bench_rollout.py", "--train-demo", str(demo), "--steps", "300"],
                                [py, "tools/bench_rollout.py", "--model", str(demo), "--rounds", "2"]], 150),
        Stage("bench_train", [[py, "tools/bench_train.py", "--model", "small", "--seq", "1024", "--batch", "4",
                               "--steps", "5"]], 120),
    ]


def last_json(text: str):
    """The last JSON document a tool printed (a one-line object or an indented one)."""
    starts = [i for i in range(len(text)) if text[i] == "{" and (i == 0 or text[i - 1] == "\n")]
    for i in reversed(starts):
        try:
            return json.loads(text[i:])
        except json.JSONDecodeError:
            continue
    return None


def junit_summary(path: Path) -> dict:
    """Counts and the failures (test id and the first line of the message) of a junit XML."""
    if not path.exists():
        return {"error": "no junit report (the run died before pytest wrote it)"}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures, skips = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            counts["failed"] += 1
            failures.append({"test": test, "message": (bad.get("message") or "").splitlines()[0][:400] if
                             bad.get("message") else (bad.text or "")[-400:]})
        elif skipped is not None:
            counts["skipped"] += 1
            reason = (skipped.get("message") or "")[:200]
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "skip_reasons": skips}


def run_stage(stage: Stage, budget_left: float) -> dict:
    limit = max(10.0, min(stage.timeout_s, budget_left))
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", **stage.env)
    start, out, rc, timed_out = time.perf_counter(), "", 0, False
    for cmd in stage.commands:
        left = limit - (time.perf_counter() - start)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(left, 1.0))
            rc, out = proc.returncode, proc.stdout + proc.stderr[-TAIL:]
            stdout = proc.stdout
        except subprocess.TimeoutExpired as e:
            rc, timed_out = 124, True
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            stdout = out
        print(f"[gpu_check] {stage.name}: {' '.join(cmd[1:3])}... rc={rc} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        if rc != 0:
            break
    report = {"command": [" ".join(c) for c in stage.commands], "rc": rc, "timed_out": timed_out,
              "seconds": round(time.perf_counter() - start, 1), "limit_s": round(limit), "tail": out[-TAIL:]}
    if stage.junit is not None:
        report["result"] = junit_summary(stage.junit)
    else:
        report["result"] = last_json(stdout) if rc == 0 else None
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="where the JSON report goes")
    p.add_argument("--budget-s", type=float, default=480, help="wall-clock budget for all stages")
    p.add_argument("--dry-run", action="store_true", help="plan, and rehearse on tiny CPU-sized settings")
    p.add_argument("--only", help="comma-separated stage names (default: all)")
    args = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        raise SystemExit("error: no CUDA GPU is visible; tools/gpu_check.py is for a GPU machine "
                         "(rehearse here with --dry-run)")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    stages = plan(work, args.dry_run)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in stages}
        if unknown:
            raise SystemExit(f"error: unknown stage(s) {sorted(unknown)}; stages are {[s.name for s in stages]}")
        stages = [s for s in stages if s.name in wanted]
    print(json.dumps({"plan": [{"stage": s.name, "commands": [" ".join(c) for c in s.commands],
                                "timeout_s": s.timeout_s, "env": s.env} for s in stages],
                      "budget_s": args.budget_s, "dry_run": args.dry_run}, indent=1), flush=True)
    report = {"tool": "tools/gpu_check.py", "dry_run": args.dry_run,
              "environment": environment("cuda" if cuda else "cpu", "bfloat16" if cuda else "float32"),
              "budget_s": args.budget_s, "stages": {}}
    start = time.perf_counter()
    for stage in stages:
        left = args.budget_s - (time.perf_counter() - start)
        if left < 10:
            report["stages"][stage.name] = {"rc": None, "skipped": "the budget was spent before this stage"}
            continue
        report["stages"][stage.name] = run_stage(stage, left)
        Path(args.out).write_text(json.dumps(report, indent=1))  # what is done so far survives a kill
    report["total_s"] = round(time.perf_counter() - start, 1)
    report["ok"] = all(s.get("rc") == 0 for s in report["stages"].values()) and not any(
        s.get("result", {}).get("failed") for s in report["stages"].values() if isinstance(s.get("result"), dict))
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({name: {k: v for k, v in s.items() if k != "tail"} for name, s in report["stages"].items()},
                     indent=1))
    print(f"[gpu_check] report: {args.out} (ok: {report['ok']}, {report['total_s']} s)")
    return report


if __name__ == "__main__":
    main()

"""The demo (tools/demo.py) as `make demo` runs it, shrunk: every stage on the `tiny` model for a
step or two, in a process of its own as a user starts it. What it must leave behind: each
stage's run directory, the evaluation of base, teachers and student on every domain, the
exported student, the MTP accept lengths and the report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.training.runs import ROOT

DOMAINS = ["reverse", "rotate", "sort"]


def test_the_whole_pipeline_runs_and_reports(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), f"out={out}", "model=tiny", "base_steps=2",
                           "teacher_steps=1", "mopd_steps=1", "eval_limit=3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    models = ["base", *[f"teacher_{d}" for d in DOMAINS], "student"]
    assert sorted(summary["results"]) == sorted(models)
    for name in models:
        assert set(DOMAINS) <= set(summary["results"][name]), name
        assert all(0.0 <= summary["results"][name][d] <= 1.0 for d in DOMAINS)
    for stage in ["base", *[f"teacher_{d}" for d in DOMAINS], "student"]:
        assert (out / stage / "metrics.jsonl").is_file(), stage
        assert (out / stage / "checkpoints" / "latest").exists(), stage
    assert summary["tokens"]["mopd"] > 0 and all(summary["tokens"][f"teacher_{d}"] > 0 for d in DOMAINS)
    assert (out / "export" / "config.json").is_file()
    spec = summary["speculative"]
    assert spec["K=0"]["mean_accept_length"] == 1.0
    assert 1.0 <= spec["K=3"]["mean_accept_length"] <= 4.0 and len(spec["K=3"]["acceptance_per_position"]) == 3
    report = (out / "report.md").read_text()
    assert "| MOPD / teachers |" in report and "![evaluation](eval/eval.png)" in report
    assert (out / "eval" / "eval.png").is_file()


def test_an_unknown_argument_is_refused_before_any_work(tmp_path):
    spec = importlib.util.spec_from_file_location("demo_tool", ROOT / "tools" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    with pytest.raises(SystemExit, match=r"unknown argument\(s\) \['mopd_step'\].*mopd_steps"):
        demo.main([f"out={tmp_path / 'demo'}", "mopd_step=120"])
    assert not (tmp_path / "demo").exists()

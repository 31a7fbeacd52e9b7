"""The demo (tools/demo.py) as `make demo` runs it, shrunk: every stage on the `tiny` model for a
step or two, in a process of its own as a user starts it. What it must leave behind: each
stage's run directory, the evaluation of base, teachers and student on every domain, the
exported student, the MTP accept lengths and the report, which names the command, commit and
machine its figures come from."""

from __future__ import annotations

import json

import pytest

from tests.training.runs import ROOT, launch, tool

DOMAINS = ["reverse", "rotate", "sort"]


def test_the_whole_pipeline_runs_and_reports(tmp_path):
    out = tmp_path / "demo"
    code, printed = launch([f"out={out}", "model=tiny", "base_steps=2", "teacher_steps=1", "mopd_steps=1",
                            "eval_limit=3"], script=ROOT / "tools" / "demo.py")
    assert code == 0, printed[-6000:]

    summary = json.loads((out / "summary.json").read_text())
    models = ["base", *[f"teacher_{d}" for d in DOMAINS], "student"]
    assert sorted(summary["results"]) == sorted(models)
    for name in models:
        assert set(DOMAINS) <= set(summary["results"][name]), name
        assert all(0.0 <= summary["results"][name][d] <= 1.0 for d in DOMAINS)
    for run in models:  # each model is a stage's run directory
        assert (out / run / "metrics.jsonl").is_file(), run
        assert (out / run / "checkpoints" / "latest").exists(), run
    assert summary["tokens"]["mopd"] > 0 and all(summary["tokens"][f"teacher_{d}"] > 0 for d in DOMAINS)
    assert (out / "export" / "config.json").is_file()
    spec = summary["speculative"]
    assert spec["K=0"]["last_round_accept_length"] == 1.0 and spec["K=0"]["depth_steps_all_rounds"].keys() == {"0"}
    k3 = spec["K=3"]
    assert 1.0 <= k3["last_round_accept_length"] <= 4.0 and len(k3["last_round_acceptance_per_position"]) == 3
    # K = 0, K = 3 and auto, interleaved over three rounds, auto held against the better fixed depth.
    assert all(len(spec[m]["rounds_tokens_per_s"]) == 3 for m in ("K=0", "K=3", "auto"))
    cmp = spec["auto_vs_best"]
    assert cmp["best_fixed"] in ("K=0", "K=3") and cmp["ratio"] > 0 and len(cmp["ratio_per_round"]) == 3
    assert sum(spec["auto"]["depth_steps_all_rounds"].values()) > 0
    report = (out / "report.md").read_text()
    assert "| auto |" in report and "| MOPD / teachers |" in report and "![evaluation](eval/eval.png)" in report
    # The figures name where they come from: the command, the commit and the machine.
    env = summary["environment"]
    assert summary["command"].startswith("python tools/demo.py out=") and "model=tiny" in summary["command"]
    assert env["commit"] and env["device"] == "cpu" and env["threads"] >= 1
    assert f"at commit {env['commit']} on cpu" in report
    assert (out / "eval" / "eval.png").is_file()
    assert "| domain | prompts | base | teacher | student | student / teacher |" in report and " +- " in report

    # tools/mopd_trial.py reruns the MOPD stage on this demo with other settings and scores it alike.
    code, printed = launch(["trial", "rl.distill_loss=topk", "rl.distill_topk=4", f"--demo={out}",
                            f"--out={tmp_path / 'trials'}"], script=ROOT / "tools" / "mopd_trial.py")
    assert code == 0, printed[-6000:]
    trial = json.loads((tmp_path / "trials" / "trial" / "trial.json").read_text())
    assert trial["overrides"] == ["rl.distill_loss=topk", "rl.distill_topk=4"] and trial["tokens"] > 0
    assert set(trial["student_vs_teacher"]) == set(DOMAINS) and set(trial["standard_error"]) == set(DOMAINS)
    assert any(k.startswith("distill/kl/") for k in trial["last_step"])  # the topk run's per-domain KL


def test_an_unknown_or_malformed_argument_is_refused_before_any_work(tmp_path):
    demo = tool("demo")
    with pytest.raises(SystemExit, match=r"unknown argument\(s\) \['mopd_step'\].*mopd_steps"):
        demo.main([f"out={tmp_path / 'demo'}", "mopd_step=120"])
    with pytest.raises(SystemExit, match=r"not key=value: \['mopd_steps'\]"):
        demo.main([f"out={tmp_path / 'demo'}", "mopd_steps"])
    assert not (tmp_path / "demo").exists()


def test_a_stage_made_with_other_settings_is_not_resumed(tmp_path):
    """Rerunning the demo resumes each stage from its checkpoint; a stage directory left by
    other settings (another version of the demo, other arguments) stops it before any work."""
    demo = tool("demo")
    stage = tmp_path / "demo" / "student"
    demo._claim_stage(stage, ["recipe=mopd", "train.steps=72"])
    demo._claim_stage(stage, ["recipe=mopd", "train.steps=72"])  # the same stage again: resumed
    with pytest.raises(SystemExit, match=r"student was made with other settings.*remove .*demo to start over"):
        demo._claim_stage(stage, ["recipe=mopd", "train.steps=36"])
    unrecorded = tmp_path / "old" / "student"
    (unrecorded / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit, match="holds checkpoints this demo did not record making"):
        demo._claim_stage(unrecorded, ["recipe=mopd"])

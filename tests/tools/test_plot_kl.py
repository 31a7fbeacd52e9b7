"""tools/plot_kl.py: per-domain curves read from a run's metrics.jsonl (the last row written for
a step wins, as after a resume), smoothed over a trailing window worked by hand, drawn as one
PNG; a run without the asked key is one `error:` line naming the fix."""

import json

from tests.training.runs import tool

plot_kl = tool("plot_kl")


def write_run(run_dir, rows):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_curves_per_domain_with_the_resumed_rows_winning(tmp_path):
    run = write_run(tmp_path / "topk", [
        {"step": 1, "distill/kl/sort": 0.4, "distill/kl/reverse": 0.9, "teacher_kl/sort": 0.1},
        {"step": 2, "distill/kl/sort": 9.0},
        {"step": 2, "distill/kl/sort": 0.2},  # written again after a resume: this one counts
        {"step": 3, "distill/kl/sort": 0.3, "distill/kl/reverse": 0.6},
    ])
    assert plot_kl.curves(run, "distill/kl") == {"sort": ([1, 2, 3], [0.4, 0.2, 0.3]), "reverse": ([1, 3], [0.9, 0.6])}
    assert plot_kl.curves(run, "teacher_kl") == {"sort": ([1], [0.1])}


def test_smoothing_is_the_mean_of_a_trailing_window():
    assert plot_kl.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert plot_kl.smooth([1.0, 3.0, 5.0], 1) == [1.0, 3.0, 5.0]


def test_two_runs_make_one_png(tmp_path, capsys):
    a = write_run(tmp_path / "a", [{"step": s, "distill/kl/sort": 1 / s, "distill/kl/rotate": 2 / s} for s in (1, 2, 3)])
    b = write_run(tmp_path / "b", [{"step": s, "distill/kl/sort": 0.5 / s} for s in (1, 2, 3)])
    assert plot_kl.main([str(a), str(b), "--out", str(tmp_path / "kl.png"), "--smooth", "2"]) == 0
    assert (tmp_path / "kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_the_key_is_one_error_line(tmp_path, capsys):
    run = write_run(tmp_path / "sampled", [{"step": 1, "teacher_kl/sort": 0.1}])
    assert plot_kl.main([str(run), "--out", str(tmp_path / "kl.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "rl.distill_loss=topk" in err[0]
    assert plot_kl.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "kl.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "kl.png").exists()

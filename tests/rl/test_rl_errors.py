"""Bad RL input is one clear `error:` line (exit code 2) before any training, and nothing
already saved is touched."""

import json

import pytest

from mimo_train.run import main
from tests.rl.rl_runs import init_args, mopd_args, teachers_override


@pytest.fixture
def run_error(capsys, megatron_single):
    """Run in this process (the errors come before any training): exit code 2 and one line."""

    def run(args) -> str:
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2, err[-3000:]
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert len(lines) == 1, err[-3000:]
        return lines[0]

    return run


def test_rows_without_a_domain(rl_data, student_init, teacher_init, tmp_path, run_error):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"domain": "sort", "prompt": "sort:cab="}) + "\n" + json.dumps({"prompt": "1+2="}) + "\n")
    args = mopd_args(rl_data, tmp_path / "run", student_init, teacher_init, f"rl.prompts={prompts}")
    message = run_error(args)
    assert "domain" in message and "row 1" in message


def test_a_domain_without_teacher(rl_data, student_init, teacher_init, tmp_path, run_error):
    args = mopd_args(rl_data, tmp_path, student_init, teacher_init) + [teachers_override(teacher_init, ["sort"])]
    message = run_error(args)
    assert "arithmetic" in message and "reverse" in message


def test_missing_teacher_checkpoint(rl_data, student_init, teacher_init, tmp_path, run_error):
    missing = tmp_path / "nowhere"
    args = mopd_args(rl_data, tmp_path / "run", student_init, teacher_init) + [teachers_override(missing)]
    message = run_error(args)
    assert str(missing) in message and "t_" in message


def test_teacher_with_another_vocabulary(rl_data, student_init, tmp_path, run_error):
    other = tmp_path / "other"
    assert main(init_args(rl_data, other, seed=3) + ["model.vocab_size=96"]) == 0
    args = mopd_args(rl_data, tmp_path / "run", student_init, other / "checkpoints")
    message = run_error(args)
    assert "96" in message and "vocab" in message


def test_teacher_server_down_keeps_the_last_checkpoint(rl_data, student_init, teacher_init, mopd_reference, tmp_path, run_error):
    import shutil

    shutil.copytree(mopd_reference / "checkpoints", tmp_path / "checkpoints")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()}
    # Same teachers by name, domain and checkpoint, now behind a server nobody runs.
    args = mopd_args(rl_data, tmp_path, student_init, teacher_init, "rl.teacher_timeout_s=0.5",
                     "rl.teacher_retries=1", steps=6)
    args = [a for a in args if not a.startswith("rl.teachers=")] + \
        [teachers_override(teacher_init, server="http://127.0.0.1:9")]
    message = run_error(args)
    assert "http://127.0.0.1:9" in message and "serve_teacher" in message
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()}
    assert after == before


def test_global_batch_must_match_the_rollout_batch(rl_data, student_init, teacher_init, tmp_path, run_error):
    args = mopd_args(rl_data, tmp_path, student_init, teacher_init, "train.global_batch=6", "train.micro_batch=1")
    message = run_error(args)
    assert "rl.prompts_per_step x rl.group_size" in message


def test_rank0_failure_is_the_same_line_on_every_rank(rl_data, tmp_path):
    """Under torchrun, rank 0 loads the teachers; its failure is every rank's one `error:` line
    (rank 1 used to print a traceback of `RuntimeError: rank 0 failed`)."""
    from tests.training.runs import launch

    missing = tmp_path / "nowhere"
    args = mopd_args(rl_data, tmp_path / "run", tmp_path / "no_student", missing)
    code, out = launch(args, nproc=2, interpreter=True)
    assert code != 0, out[-3000:]
    lines = [l for l in out.splitlines() if "error:" in l]
    assert len(lines) == 2 and lines[0] == lines[1], out[-3000:]
    assert str(missing) in lines[0] and "t_" in lines[0]
    # No rank prints a traceback (torchrun's own ChildFailedError summary, which names the exit
    # codes, is the launcher's and comes after the ranks have reported).
    assert "rank 0 failed" not in out and "mimo_train/" not in out.split("ChildFailedError")[0], out[-3000:]

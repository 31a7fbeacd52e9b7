"""MOPD runs end to end on the tiny model: the same numbers under DP=2 and TP=2 as in one
process, exact resume after kill -9, teachers pinned to the checkpoint."""

import math
import time

import pytest

from tests.rl.rl_runs import DOMAINS, mopd_args, teachers_override
from tests.training.runs import launch, metrics, train, train_here

# What a step computes from the rollouts: equal only if the rollouts, the teachers' scores,
# the recomputed log-probs, the MTP losses and the weight sync all agree.
COMPARED = ["loss/policy", "rl/teacher_minus_student_logprob", "rl/ratio_mean", "rl/advantage_mean",
            "reward/mean", "rollout/response_length", "loss/mtp_1", "loss/mtp_2", "loss/mtp_3", "grad_norm"]


def assert_close(a: dict, b: dict, keys=COMPARED, rel: float = 1e-5, abs_tol: float = 1e-6):
    """rel for losses; abs for the policy loss and advantage means, which are sums of O(1)
    per-token terms of both signs that cancel to ~1e-3: a relative bound on the sum would ask
    more than fp32 gives when DP/TP change the summation order."""
    for key in keys:
        assert math.isclose(a[key], b[key], rel_tol=rel, abs_tol=abs_tol), f"{key}: {a[key]} vs {b[key]}"


def test_reference_run_logs_the_rl_signals(mopd_reference):
    rows = metrics(mopd_reference)
    assert sorted(rows) == [1, 2, 3, 4]
    first = rows[1]
    # A different random teacher: a dense per-token signal (both signs), not a constant.
    assert first["rl/advantage_std"] > 0.05 and first["loss/policy"] != 0
    # Routing replayed and the same weights in engine and trainer: pi_train / pi_rollout == 1.
    assert abs(first["rl/ratio_mean"] - 1) < 1e-4 and first["rl/is_masked_fraction"] == 0
    assert all(f"teacher_kl/{d}" in rows[s] or f"reward/{d}" not in rows[s] for s in rows for d in DOMAINS)
    assert rows[2]["rollout/policy_version"] == 1  # step 2 sampled from the weights of update 1
    for key in ("time/rollout", "time/teacher", "time/sync", "rollout/accept_length", "rollout/tokens_per_s"):
        assert key in first


@pytest.mark.parametrize("layout", [["parallel.tp=1"], ["parallel.tp=2"]], ids=["dp2", "tp2"])
def test_world_size_2_matches_one_process(layout, rl_data, student_init, teacher_init, mopd_reference, tmp_path):
    train(mopd_args(rl_data, tmp_path, student_init, teacher_init, *layout), nproc=2)
    ours, reference = metrics(tmp_path), metrics(mopd_reference)
    for step in (1, 2):
        assert_close(ours[step], reference[step])


def test_kill_9_then_resume_equals_an_uninterrupted_run(rl_data, student_init, teacher_init, mopd_reference, tmp_path):
    args = mopd_args(rl_data, tmp_path, student_init, teacher_init, "checkpoint.every=2", "checkpoint.keep_last=5",
                     steps=4)
    proc = launch(args, wait=False)
    latest = tmp_path / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.exists() and latest.read_text() == "iter_0000002"):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler, no final save
    proc.wait()
    assert latest.read_text() == "iter_0000002" and not (tmp_path / "checkpoints" / "iter_0000004").exists()

    out = train(args)
    assert "resumed from" in out and "iter_0000002" in out
    ours, reference = metrics(tmp_path), metrics(mopd_reference)
    for step in (3, 4):
        assert_close(ours[step], reference[step], COMPARED + ["rollout/policy_version", "rollout/accept_length"],
                     rel=1e-9, abs_tol=0.0)


def test_resuming_with_other_teachers_is_refused(rl_data, student_init, teacher_init, mopd_reference, tmp_path):
    import shutil

    shutil.copytree(mopd_reference / "checkpoints", tmp_path / "checkpoints")
    args = mopd_args(rl_data, tmp_path, student_init, teacher_init, steps=6)
    args = [a for a in args if not a.startswith("rl.teachers=")] + [teachers_override(student_init)]
    code, out = launch(args)
    assert code == 2
    assert "was trained with teachers" in out and "rl.teachers" in out


def test_routing_replay_off_logs_router_disagreement(rl_data, student_init, teacher_init, tmp_path, megatron_single):
    train_here(mopd_args(rl_data, tmp_path, student_init, teacher_init, "rl.routing_replay=false", steps=1))
    row = metrics(tmp_path)[1]
    assert 0 <= row["moe/router_disagreement"] <= 1

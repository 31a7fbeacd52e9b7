"""GRPO and MOPD with rollout=vllm, end to end through mimo_train/run.py, on real vLLM servers:
samples whose log-probs are the trainer's (ratio 1, nothing masked), the same numbers under
DP=2 and TP=2 as in one process, kill -9 and resume equal to an uninterrupted run with no vLLM
process left behind, and a server that dies mid-run stopping the run with one error line."""

import math
import os
import signal
import time

import pytest

from tests.rl.rl_runs import vllm_args
from tests.rollout.vllm_utils import group_members, server_groups, vllm, vllm_processes
from tests.training.runs import launch, metrics, train, train_here

pytestmark = vllm

# A step's trainer-side numbers: equal only if the samples, the teachers' scores, the recomputed
# log-probs and the weights the server sampled with all agree.
COMPARED = ["loss/policy", "rl/ratio_mean", "rl/advantage_mean", "reward/mean", "rollout/response_length",
            "loss/mtp_1", "grad_norm"]


def assert_close(a: dict, b: dict, keys=COMPARED, rel: float = 1e-5, abs_tol: float = 1e-5):
    """As tests/rl/test_mopd_runs.py's, with abs 1e-5: the policy loss is a sum of O(1) terms
    that cancel to ~1e-2, and here the rollout log-probs come from vLLM's kernels on weights whose
    last bits follow the trainer's reduction order (TP=2 vs one process: 2e-6 measured)."""
    for key in keys:
        assert math.isclose(a[key], b[key], rel_tol=rel, abs_tol=abs_tol), f"{key}: {a[key]} vs {b[key]}"


def assert_on_policy(rows: dict) -> None:
    for step, row in rows.items():
        # vLLM's log-probs (after temperature) are the trainer's: pi_train / mu_rollout == 1.
        assert abs(row["rl/ratio_mean"] - 1) < 1e-3 and row["rl/is_masked_fraction"] == 0, (step, row["rl/ratio_mean"])
        assert row["rollout/policy_version"] == step - 1  # sampled with the weights of the previous update
        assert row["sync/bytes"] > 0 and 0 < row["sync/largest_bucket_bytes"] <= 64 << 20


@pytest.fixture(scope="module")
def mopd_one_process(rl_data, student32, teacher32, vllm_server, tmp_path_factory, megatron_single):
    run_dir = tmp_path_factory.mktemp("mopd_vllm")
    train_here(vllm_args("mopd", rl_data, run_dir, student32, teacher=teacher32, url=vllm_server))
    return run_dir


GRPO_STEPS = ["checkpoint.every=1", "checkpoint.keep_last=10"]  # the kill -9 test's run stops at a checkpoint


@pytest.fixture(scope="module")
def grpo_one_process(rl_data, student32, vllm_server, tmp_path_factory, megatron_single):
    """5 steps: its first 2 are the world-size-2 runs' reference, all 5 the resumed run's (the
    learning rate is constant: a step does not depend on the run's length)."""
    run_dir = tmp_path_factory.mktemp("grpo_vllm")
    train_here(vllm_args("grpo", rl_data, run_dir, student32, *GRPO_STEPS, url=vllm_server, steps=5))
    return run_dir


def test_mopd_samples_from_vllm_are_on_policy(mopd_one_process):
    rows = metrics(mopd_one_process)
    assert sorted(rows) == [1, 2]
    assert_on_policy(rows)
    assert rows[1]["rl/advantage_std"] > 0.05 and rows[1]["loss/policy"] != 0  # a random teacher: a real signal
    assert any(k.startswith("teacher_kl/") for k in rows[1])


@pytest.mark.parametrize("recipe,layout", [("mopd", "parallel.tp=1"), ("grpo", "parallel.tp=2")],
                         ids=["mopd-dp2", "grpo-tp2"])
def test_world_size_2_matches_one_process(recipe, layout, rl_data, student32, teacher32, vllm_server, request, tmp_path):
    teacher = teacher32 if recipe == "mopd" else None
    train(vllm_args(recipe, rl_data, tmp_path, student32, layout, teacher=teacher, url=vllm_server), nproc=2)
    ours, reference = metrics(tmp_path), metrics(request.getfixturevalue(f"{recipe}_one_process"))
    assert_on_policy(ours)
    for step in (1, 2):
        assert_close(ours[step], reference[step])


def wait_for(path_text, proc, timeout_s=300):
    deadline = time.time() + timeout_s
    while not path_text():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def no_process_left(groups: set[int], marker: str, timeout_s: float = 30) -> None:
    """Neither a process of the server's groups (engine core and workers included) nor anything
    mentioning the run's directory (the watchdog) is alive."""
    deadline = time.time() + timeout_s
    while (group_members(groups) or vllm_processes(marker)) and time.time() < deadline:
        time.sleep(0.2)
    assert not group_members(groups) and not vllm_processes(marker), group_members(groups) + vllm_processes(marker)


def test_grpo_kill_9_stops_its_servers_and_resume_equals_an_uninterrupted_run(rl_data, student32, vllm_server,
                                                                              grpo_one_process, tmp_path):
    steps, reference = GRPO_STEPS, grpo_one_process
    killed = tmp_path / "killed"
    proc = launch(vllm_args("grpo", rl_data, killed, student32, *steps, steps=5), wait=False)  # its own server
    latest = killed / "checkpoints" / "latest"
    wait_for(lambda: latest.exists() and latest.read_text() == "iter_0000002", proc)
    groups = server_groups(str(killed))
    assert groups and len(group_members(groups)) >= 2  # API server, engine core (with the worker)
    proc.kill()  # SIGKILL: no handler runs, no final save
    proc.wait()
    assert (killed / "vllm" / "server0.log").exists()
    no_process_left(groups, str(killed))  # the watchdog took the server's whole process tree down
    first = metrics(killed)
    assert_on_policy({s: first[s] for s in (1, 2)})
    out = train(vllm_args("grpo", rl_data, killed, student32, *steps, url=vllm_server, steps=5))
    assert "resumed from" in out
    ours, ref = metrics(killed), metrics(reference)
    assert sorted(ours) == [1, 2, 3, 4, 5]
    for step in ours:
        assert_close(ours[step], ref[step], rel=1e-6, abs_tol=1e-7)


def test_a_server_that_dies_mid_run_stops_the_run_with_one_error(rl_data, student32, tmp_path):
    proc = launch(vllm_args("grpo", rl_data, tmp_path, student32, "checkpoint.every=1", "rollout.vllm.retries=2",
                            steps=4), wait=False)
    latest = tmp_path / "checkpoints" / "latest"
    wait_for(lambda: latest.exists() and latest.read_text() == "iter_0000001", proc)
    groups = server_groups(str(tmp_path))
    assert groups, "no vLLM server"
    for group in groups:  # the API server; the watchdog sees it go and stops its engine and workers
        os.kill(group, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "vLLM server" in errors[0] and "server0.log" in errors[0], errors
    assert "Traceback" not in out
    assert int(latest.read_text().removeprefix("iter_")) >= 1  # the last checkpoint is intact
    no_process_left(groups, str(tmp_path))


def test_a_server_for_another_model_is_refused_before_any_work(rl_data, student32, vllm_server, tmp_path):
    code, out = launch(vllm_args("grpo", rl_data, tmp_path, student32, "model.sliding_window_size=4",
                                 url=vllm_server))
    assert code == 2
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not this run's model" in errors[0] and "sliding_window_size" in errors[0], out[-2000:]
    assert not (tmp_path / "metrics.jsonl").exists()

"""MOPD runs whose teachers are vLLM servers the run starts (rollout on our engine): the
teachers' scores are the in-process teachers' within 1e-4; a teacher server that dies mid-run
stops the run with one error line, the last checkpoint intact and no vLLM process left."""

import math
import os
import signal

import pytest

from tests.rl.rl_runs import mopd_args, teachers_override
from tests.rl.test_vllm_runs import no_process_left, wait_for
from tests.rollout.vllm_utils import server_groups, vllm
from tests.training.runs import launch, metrics, train, train_here

pytestmark = vllm
VLLM_TEACHERS = "rollout.vllm.kv_cache_gb=0.125"  # the servers' settings come from rollout.vllm


def test_two_step_mopd_with_vllm_teachers_equals_in_process_teachers(rl_data, student_init, teacher32, tmp_path,
                                                                     megatron_single):
    reference, served = tmp_path / "in_process", tmp_path / "vllm"
    train_here(mopd_args(rl_data, reference, student_init, teacher32))
    out = train(mopd_args(rl_data, served, student_init, teacher32, teachers_override(teacher32, vllm=True),
                          VLLM_TEACHERS))
    assert len(list((served / "vllm").glob("teacher_*/server.log"))) == 1  # three domains, one checkpoint: one server
    ours, ref = metrics(served), metrics(reference)
    assert sorted(ours) == [1, 2]
    kl_keys = [k for k in ref[1] if k.startswith("teacher_kl/")]
    assert len(kl_keys) == 3, kl_keys
    for step in (1, 2):
        for key in kl_keys + ["rl/advantage_mean", "loss/policy"]:
            assert math.isclose(ours[step][key], ref[step][key], rel_tol=0, abs_tol=1e-4), (step, key)
    assert ours[1]["rl/advantage_std"] > 0.05  # a teacher unlike the student: the scores carry a signal
    assert not server_groups(str(served)), out[-2000:]  # stopped with the run


def test_a_teacher_server_that_dies_mid_run_stops_the_run_with_one_error(rl_data, student_init, teacher32, tmp_path):
    proc = launch(mopd_args(rl_data, tmp_path, student_init, teacher32, teachers_override(teacher32, vllm=True),
                            VLLM_TEACHERS, "checkpoint.every=1", "rl.teacher_retries=2", "rl.teacher_timeout_s=10",
                            steps=4), wait=False)
    latest = tmp_path / "checkpoints" / "latest"
    wait_for(lambda: latest.exists() and latest.read_text() == "iter_0000001", proc)
    groups = server_groups(str(tmp_path))
    assert groups, "no teacher server"
    for group in groups:
        os.kill(group, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "teacher 't_" in errors[0] and "on vLLM" in errors[0] and "server.log" in errors[0], errors
    assert "Traceback" not in out
    assert int(latest.read_text().removeprefix("iter_")) >= 1
    no_process_left(groups, str(tmp_path))


def test_vllm_teachers_refuse_a_temperature_they_cannot_score_at(rl_data, student_init, teacher32, tmp_path):
    code, out = launch(mopd_args(rl_data, tmp_path, student_init, teacher32, teachers_override(teacher32, vllm=True),
                                 "rl.temperature=0.7"))
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "scores at temperature 1 only" in errors[0], out[-2000:]

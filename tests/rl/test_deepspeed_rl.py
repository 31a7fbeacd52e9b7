"""MOPD and GRPO for a transformers student (trainer=deepspeed): rollouts on a vLLM server that
receives the student's weights after every step, teachers of another architecture (our MiMo
checkpoints) sharing its tokenizer, and one error line for a student the teachers cannot score."""

import math

import pytest

from mimo_train.run import main
from tests.rollout.vllm_utils import SERVER_THREADS_ARG, vllm
from tests.rl.rl_runs import teachers_override
from tests.training.runs import metrics, tool, train

DOMAINS = ("arithmetic", "reverse", "sort")


@pytest.fixture(scope="module")
def llama(rl_data, tmp_path_factory):
    """A tiny transformers Llama on the RL data's tokenizer, with the tiny MiMo's vocabulary (256)."""
    return tool("make_student").make(tmp_path_factory.mktemp("llama") / "llama", arch="llama",
                                     tokenizer=rl_data / "tokenizer", seed=3)


def ds_args(recipe: str, data, run_dir, student, *extra, teacher=None, steps: int = 2) -> list[str]:
    """4 prompts x 2 samples of at most 6 new tokens per step, ZeRO-3 on however many ranks."""
    teachers = [teachers_override(teacher)] if teacher else []
    return [f"recipe={recipe}", "trainer=deepspeed", f"trainer.model_dir={student}", "rollout=vllm",
            "rollout.vllm.kv_cache_gb=0.25", SERVER_THREADS_ARG, f"train.steps={steps}", "train.global_batch=8",
            "train.micro_batch=2",
            "rl.prompts_per_step=4", "rl.group_size=2", "rl.max_new_tokens=6", "rl.alpha=0.5",
            f"rl.prompts={data}/train.jsonl", f"data.tokenizer={data}/tokenizer", *teachers, "optim.lr=1e-3",
            "optim.min_lr=1e-3", "optim.warmup_steps=0", f"logging.run_dir={run_dir}", "logging.progress=false",
            "logging.plot=false", *extra]


@vllm
def test_mopd_two_steps_on_two_ranks_with_a_mimo_teacher(rl_data, llama, teacher32, tmp_path):
    train(ds_args("mopd", rl_data, tmp_path, llama, "rl.distill_loss=topk", "rl.distill_topk=8", teacher=teacher32),
          nproc=2)
    rows = metrics(tmp_path)
    assert sorted(rows) == [1, 2]
    for step, row in rows.items():
        assert math.isfinite(row["loss/policy"]) and row["skipped"] == 0
        assert row["rollout/policy_version"] == step - 1  # step 2 sampled the weights step 1 pushed
        # The server's log-probs are the trainer's: its weights are the student's after each push.
        assert row["rl/ratio_mean"] == pytest.approx(1.0, abs=1e-3)
        assert row["rl/is_masked_fraction"] == 0.0
        scored = [d for d in DOMAINS if f"teacher_kl/{d}" in row]
        assert scored and all(f"distill/kl/{d}" in row for d in scored)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "iter_0000002"


@vllm
def test_grpo_two_steps_in_one_process(rl_data, llama, tmp_path):
    train(ds_args("grpo", rl_data, tmp_path, llama, "trainer.zero_stage=2"))
    rows = metrics(tmp_path)
    assert sorted(rows) == [1, 2]
    for step, row in rows.items():
        assert math.isfinite(row["loss/policy"]) and row["rollout/policy_version"] == step - 1
        assert row["rl/ratio_mean"] == pytest.approx(1.0, abs=1e-3)
        assert "teacher_kl/sort" not in row and "rl/teacher_minus_student_logprob" not in row  # no teachers


def test_a_student_whose_vocabulary_is_not_the_teachers_is_refused(capsys, rl_data, teacher32, tmp_path):
    student = tool("make_student").make(tmp_path / "wide", arch="qwen2", tokenizer=rl_data / "tokenizer",
                                        vocab_size=320)
    assert main(ds_args("mopd", rl_data, tmp_path / "run", student, teacher=teacher32)) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "320" in lines[0] and "256" in lines[0], lines

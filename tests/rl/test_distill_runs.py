"""MOPD with distribution-level losses end to end (rl.distill_loss full / topk): per-domain KL
metrics, the same numbers under DP=2 and TP=2 (vocab-parallel logits: the KL is taken across
the vocabulary shards) as in one process, and topk over the whole vocabulary equal to full."""

import math

import pytest

from tests.rl.rl_runs import DOMAINS, mopd_args
from tests.rl.test_mopd_runs import assert_close
from tests.training.runs import metrics, train, train_here

COMPARED = ["loss/policy", "rl/ratio_mean", "reward/mean", "loss/mtp_1", "grad_norm"] + \
    [f"distill/{m}/{d}" for m in ("kl", "teacher_topk_mass", "student_topk_mass") for d in DOMAINS]
VOCAB = 256  # the tiny preset's


@pytest.fixture(scope="module")
def topk_reference(rl_data, student_init, teacher_init, tmp_path_factory, megatron_single):
    run = tmp_path_factory.mktemp("topk_ref")
    train_here(mopd_args(rl_data, run, student_init, teacher_init, "rl.distill_loss=topk", "rl.distill_topk=8"))
    return run


def test_a_topk_run_logs_each_domains_kl_to_its_teacher(topk_reference):
    rows = metrics(topk_reference)
    first = rows[1]
    for d in DOMAINS:
        if f"reward/{d}" not in first:
            continue  # no prompt of this domain in the step
        # Two random models: nearly uniform, so close, yet apart (each KL term is >= 0); a top 8
        # holds at least 8/256 of the teacher's mass, and less of the student's.
        assert first[f"distill/kl/{d}"] > 1e-4
        assert 8 / VOCAB <= first[f"distill/teacher_topk_mass/{d}"] < 1
        assert 0 < first[f"distill/student_topk_mass/{d}"] < first[f"distill/teacher_topk_mass/{d}"]
    assert first["loss/policy"] > 0  # the KL term (>= 0) dominates: alpha x outcome is small here


@pytest.mark.parametrize("layout", [["parallel.tp=1"], ["parallel.tp=2"]], ids=["dp2", "tp2"])
def test_world_size_2_matches_one_process(layout, rl_data, student_init, teacher_init, topk_reference, tmp_path):
    train(mopd_args(rl_data, tmp_path, student_init, teacher_init, "rl.distill_loss=topk", "rl.distill_topk=8",
                    *layout), nproc=2)
    ours, reference = metrics(tmp_path), metrics(topk_reference)
    for step in (1, 2):
        assert_close(ours[step], reference[step], [k for k in COMPARED if k in reference[step]])


def test_topk_over_the_whole_vocabulary_is_full(rl_data, student_init, teacher_init, tmp_path, megatron_single):
    train_here(mopd_args(rl_data, tmp_path / "full", student_init, teacher_init, "rl.distill_loss=full"))
    train_here(mopd_args(rl_data, tmp_path / "topk", student_init, teacher_init, "rl.distill_loss=topk",
                         f"rl.distill_topk={VOCAB}"))
    full, topk = metrics(tmp_path / "full"), metrics(tmp_path / "topk")
    for step in (1, 2):
        assert_close(full[step], topk[step], [k for k in COMPARED if k in full[step]])
        assert all(math.isclose(full[step][f"distill/teacher_topk_mass/{d}"], 1.0, rel_tol=1e-5)
                   for d in DOMAINS if f"distill/kl/{d}" in full[step])

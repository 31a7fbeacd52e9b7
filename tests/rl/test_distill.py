"""mimo_train.rl.distill: the student's reverse KL to its teacher, over the whole vocabulary
(`full`) or the teacher's top-k (`topk`), and how they relate to the sampled estimator of
rl.loss (`sampled`).

Expected numbers are worked out by hand in the comments (probabilities that are powers of 1/2,
so every log is a multiple of ln 2), the sampled estimator is held to the KL's gradient by Monte
Carlo, and the tensor-parallel path to one process.
"""

import math
from pathlib import Path

import pytest
import torch

from mimo_train.rl import distill
from mimo_train.rl.loss import distill_advantages, policy_loss
from tests.rl import distill_tp_worker
from tests.training.runs import launch

ROOT = Path(__file__).resolve().parents[2]
LN2 = math.log(2)
TOL = dict(rtol=1e-6, atol=1e-6)


def close(got: torch.Tensor, want, **tol) -> None:
    want = torch.as_tensor(want, dtype=torch.float64)
    torch.testing.assert_close(got.detach().double(), want, **(tol or TOL))


# ---------------------------------------------------------------- hand-worked values, V = 4

# Position 0: p_s = [1/2, 1/4, 1/8, 1/8] (logits 2 ln2, ln2, 0, 0 plus any constant: softmax
# ignores it), p_t = [1/4, 1/2, 1/8, 1/8]. Position 1: p_s = [1/8, 1/8, 1/4, 1/2],
# p_t = [1/2, 1/4, 1/8, 1/8].
STUDENT = [[2 * LN2 + 3.0, LN2 + 3.0, 3.0, 3.0], [0.0, 0.0, LN2, 2 * LN2]]
TEACHER = [[math.log(1 / 4), math.log(1 / 2), math.log(1 / 8), math.log(1 / 8)],
           [math.log(1 / 2), math.log(1 / 4), math.log(1 / 8), math.log(1 / 8)]]
TOP2_IDS = [[1, 0], [0, 1]]  # the teacher's top-2, most likely first

# d = log p_s - log p_t:  position 0: [ln2, -ln2, 0, 0];  position 1: [-2 ln2, -ln2, ln2, 2 ln2]
# KL = sum p_s d:
#   position 0: 1/2 ln2 - 1/4 ln2 = 1/4 ln2
#   position 1: (-2/8 - 1/8 + 1/4 + 1) ln2 = 7/8 ln2
FULL = [LN2 / 4, 7 * LN2 / 8]
# Over S = the teacher's top-2, each term p_s d - p_s + p_t:
#   position 0: id 1: 1/4 (-ln2) - 1/4 + 1/2 = 1/4 - ln2/4;  id 0: 1/2 ln2 - 1/2 + 1/4 = ln2/2 - 1/4
#               sum ln2/4: the full KL, since p_s = p_t off S
#   position 1: id 0: 1/8 (-2 ln2) - 1/8 + 1/2 = 3/8 - ln2/4;  id 1: 1/8 (-ln2) - 1/8 + 1/4 = 1/8 - ln2/8
#               sum 1/2 - 3/8 ln2 = 0.2400698...: below the full 7/8 ln2, whose excess is the
#               student's mass on ids 2, 3 that the teacher's top-2 does not see
TOPK = [LN2 / 4, 1 / 2 - 3 * LN2 / 8]
MASS = [1 / 2 + 1 / 4, 1 / 8 + 1 / 8]  # the student's mass on S
# d KL / d z_u = p_u (d_u - KL):
#   position 0: [1/2 (3/4), 1/4 (-5/4), 1/8 (-1/4), 1/8 (-1/4)] ln2 = [3/8, -5/16, -1/32, -1/32] ln2
#   position 1: [1/8 (-23/8), 1/8 (-15/8), 1/4 (1/8), 1/2 (9/8)] ln2 = [-23/64, -15/64, 2/64, 36/64] ln2
FULL_GRAD = [[LN2 * x for x in (3 / 8, -5 / 16, -1 / 32, -1 / 32)],
             [LN2 * x / 64 for x in (-23, -15, 2, 36)]]
# d topk / d z_u = [u in S] p_u d_u - p_u sum_{v in S} p_v d_v (the -p_s + p_t terms cancel the
# derivative of p_s that multiplies d):
#   position 0: sum_S p d = ln2/4 -> [1/2 - 1/8, -1/4 - 1/16, -1/32, -1/32] ln2 (= the full KL's)
#   position 1: sum_S p d = -3/8 ln2 -> [-2/8 + 3/64, -1/8 + 3/64, 6/64, 12/64] ln2
TOPK_GRAD = [FULL_GRAD[0], [LN2 * x / 64 for x in (-13, -5, 6, 12)]]


def test_full_and_topk_kl_by_hand():
    logits = torch.tensor(STUDENT, requires_grad=True)
    full = distill.full_kl(logits, torch.tensor(TEACHER))
    close(full, FULL)
    full.sum().backward()
    close(logits.grad, FULL_GRAD)

    logits.grad = None
    ids = torch.tensor(TOP2_IDS)
    topk, mass = distill.topk_kl(logits, ids, torch.tensor(TEACHER).gather(-1, ids))
    close(topk, TOPK)
    close(mass, MASS)
    assert not mass.requires_grad
    topk.sum().backward()
    close(logits.grad, TOPK_GRAD)


def test_student_equal_to_teacher_gives_zero_loss_and_gradient():
    teacher = torch.tensor(TEACHER)
    logits = (teacher + 5.0).requires_grad_(True)
    full = distill.full_kl(logits, teacher)
    ids = torch.tensor(TOP2_IDS)
    topk, _ = distill.topk_kl(logits, ids, teacher.gather(-1, ids))
    (full.sum() + topk.sum()).backward()
    close(full, [0.0, 0.0])
    close(topk, [0.0, 0.0])
    close(logits.grad, torch.zeros(2, 4))


# ---------------------------------------------------------------- the sampled estimator

def _estimator_case():
    logits = torch.tensor([1.0, 0.2, -0.5, 0.7, -1.3], dtype=torch.float64)
    teacher = torch.log_softmax(torch.tensor([-0.3, 1.1, 0.4, -0.9, 0.0], dtype=torch.float64), -1)
    return logits, teacher


def _kl_gradient(logits, teacher) -> torch.Tensor:
    z = logits.clone().requires_grad_(True)
    distill.full_kl(z[None], teacher[None]).sum().backward()
    return z.grad.double()


def _per_sample_gradients(logits, teacher, y, *, detach=True) -> torch.Tensor:
    """d/dz of -(adv_y) * log p_s(y) for each sampled y: -(adv_y) * (onehot(y) - p_s), with
    adv_y = log p_t(y) - log p_s(y) held constant. Without the detach the advantage is
    differentiated too: d/dz [-(lt_y - ls_y) ls_y] = -(lt_y - 2 ls_y) (onehot(y) - p_s)."""
    ls = torch.log_softmax(logits, -1)
    onehot = torch.nn.functional.one_hot(y, ls.numel()).double()
    coef = teacher[y] - ls[y] if detach else teacher[y] - 2 * ls[y]
    return -coef[:, None] * (onehot - ls.exp())


def _policy_loss_gradient(logits, teacher, y) -> torch.Tensor:
    """The gradient the trainer's `sampled` loss takes: policy_loss(kind="mopd") with the
    advantage of rl.loss.distill_advantages, over the sampled tokens as one sequence (token
    weight 1/n: their mean) and rollout log-probs equal to the trainer's (IS weight 1)."""
    z = logits.clone().requires_grad_(True)
    lp = torch.log_softmax(z.expand(len(y), -1), -1).gather(-1, y[:, None]).T  # [1, n]
    adv = distill_advantages(teacher[y][None], lp)
    mask = torch.ones_like(lp)
    loss, metrics = policy_loss(lp, lp.detach(), adv, mask, mask / len(y), kind="mopd")
    assert metrics["is_masked"].item() == 0
    loss.backward()
    return z.grad


def test_sampled_estimator_expectation_is_the_full_kl_gradient():
    """Exactly, summing over the 5 tokens weighted by p_s: E_y[-(lt_y - ls_y) (onehot(y) - p_s)]
    = p_s (ls - lt) - KL p_s = d KL / d z."""
    logits, teacher = _estimator_case()
    y = torch.arange(5)
    expectation = (torch.softmax(logits, -1)[:, None] * _per_sample_gradients(logits, teacher, y)).sum(0)
    close(expectation, _kl_gradient(logits, teacher))


def test_sampled_estimator_is_unbiased_for_the_full_kl_gradient():
    """Monte Carlo over tokens drawn from p_s: the mean gradient of the real policy_loss(mopd)
    is within 4 standard errors of the full KL's gradient on every coordinate; the same rule
    without the detach, or with the sign flipped, is not."""
    logits, teacher = _estimator_case()
    n = 4000
    y = torch.multinomial(torch.softmax(logits, -1), n, replacement=True,
                          generator=torch.Generator().manual_seed(0))
    per_sample = _per_sample_gradients(logits, teacher, y)
    # the vectorised per-sample formula is what the real loss differentiates: for one sample
    # and for the mean over all of them
    close(per_sample[0], _policy_loss_gradient(logits, teacher, y[:1]), rtol=1e-12, atol=1e-12)
    mean = _policy_loss_gradient(logits, teacher, y)
    close(mean, per_sample.mean(0), rtol=1e-12, atol=1e-12)

    exact = _kl_gradient(logits, teacher)
    se = per_sample.std(0) / math.sqrt(n)
    assert (se > 0).all() and se.max() < 0.02  # the test can resolve a biased rule
    z = (mean - exact).abs() / se
    assert z.max() <= 4, f"sampled estimator off the KL gradient by {z.max():.2f} standard errors"

    undetached = _per_sample_gradients(logits, teacher, y, detach=False)
    z_undetached = (undetached.mean(0) - exact).abs() / (undetached.std(0) / math.sqrt(n))
    assert z_undetached.max() > 4, "differentiating the advantage must be rejected"
    z_flipped = (-mean - exact).abs() / se
    assert z_flipped.max() > 4, "the flipped sign must be rejected"


# ---------------------------------------------------------------- top-k with k = the vocabulary

def _random_case(n: int, v: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = 1.5 * torch.randn(n, v, generator=g)
    teacher = torch.log_softmax(1.5 * torch.randn(n, v, generator=g), -1)
    order = torch.argsort(torch.rand(n, v, generator=g), -1)  # each row a different shuffle
    return logits, teacher, order


def _value_and_grad(fn, logits):
    z = logits.clone().requires_grad_(True)
    out = fn(z)
    out.sum().backward()
    return out.detach(), z.grad


def test_topk_over_the_whole_vocabulary_in_any_order_is_full_kl():
    """The added -p_s + p_t terms sum to 1 - 1 over the whole vocabulary."""
    logits, teacher, order = _random_case(3, 6, seed=1)
    full, full_grad = _value_and_grad(lambda z: distill.full_kl(z, teacher), logits)
    topk, topk_grad = _value_and_grad(lambda z: distill.topk_kl(z, order, teacher.gather(-1, order))[0], logits)
    close(topk, full)
    close(topk_grad, full_grad)
    _, mass = distill.topk_kl(logits, order, teacher.gather(-1, order))
    close(mass, torch.ones(3))


def test_dense_teacher_round_trips_a_shuffled_full_topk():
    _, teacher, order = _random_case(3, 6, seed=2)
    dense = distill.dense_teacher(order, teacher.gather(-1, order), 6)
    assert dense.dtype == torch.float32
    assert torch.equal(dense, teacher)


def test_dense_teacher_refuses_a_partial_topk():
    _, teacher, order = _random_case(3, 6, seed=3)
    with pytest.raises(ValueError, match=r"distill_loss=full needs the teacher's log-prob of every token: got 5 of 6"):
        distill.dense_teacher(order[:, :5], teacher.gather(-1, order[:, :5]), 6)
    repeated = order.clone()
    repeated[1, 0] = repeated[1, 1]  # six ids, one twice: another token's entry would stay unwritten
    with pytest.raises(ValueError, match=r"not every token once"):
        distill.dense_teacher(repeated, teacher.gather(-1, repeated), 6)


def test_mismatched_teacher_shapes_are_one_clear_error():
    logits = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"teacher log-probs \(2, 3\) do not match the logits' \(2, 4\)"):
        distill.full_kl(logits, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"must both be \[positions=2, k\]"):
        distill.topk_kl(logits, torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"must both be \[positions=2, k\]"):
        distill.topk_kl(logits, torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))


# ---------------------------------------------------------------- chunks of positions

def test_chunks_of_positions_change_nothing(monkeypatch):
    """7 positions in chunks of 3 (3 + 3 + 1) give the values and gradients of one chunk."""
    logits, teacher, order = _random_case(7, 6, seed=4)
    ids, top = order[:, :2], teacher.gather(-1, order[:, :2])

    def all_losses():
        full = _value_and_grad(lambda z: distill.full_kl(z, teacher), logits)
        topk = _value_and_grad(lambda z: distill.topk_kl(z, ids, top)[0], logits)
        picked = _value_and_grad(lambda z: distill.student_logprobs_at(z, ids), logits)
        return [*full, *topk, *picked]

    whole = all_losses()
    calls = []
    softmax = distill.vocab_log_softmax
    monkeypatch.setattr(distill, "vocab_log_softmax", lambda z, group=None: calls.append(len(z)) or softmax(z, group))
    monkeypatch.setattr(distill, "CHUNK", 3)
    chunked = all_losses()
    assert calls == [3, 3, 1] * 3  # full_kl, topk_kl, student_logprobs_at: each in 3 chunks
    for a, b in zip(chunked, whole):
        close(a, b)


# ---------------------------------------------------------------- tensor parallelism

@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """Both ranks' results from one 2-rank launch of the worker (torchrun's variables, forked
    from the suite's zygote: tests/training/runs.py's `launch`)."""
    out = tmp_path_factory.mktemp("distill_tp2")
    code, printed = launch([str(out)], nproc=2, script=ROOT / "tests" / "rl" / "distill_tp_worker.py")
    assert code == 0, printed[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def one_process():
    c = distill_tp_worker.case()
    full, full_grad = _value_and_grad(lambda z: distill.full_kl(z, c["teacher"]), c["logits"])
    topk, topk_grad = _value_and_grad(lambda z: distill.topk_kl(z, c["top_ids"], c["top_lp"])[0], c["logits"])
    _, mass = distill.topk_kl(c["logits"], c["top_ids"], c["top_lp"])
    return {"full": full, "full_grad": full_grad, "topk": topk, "topk_grad": topk_grad, "mass": mass}


def test_tp2_case_covers_both_shards():
    """Some position has all its top-k ids on one rank's shard, some has ids on both."""
    ids = distill_tp_worker.case()["top_ids"]
    half = distill_tp_worker.V // 2
    on_rank1 = (ids >= half).sum(-1)
    assert (on_rank1 == 0).any() and (on_rank1 == ids.shape[-1]).any()
    assert ((on_rank1 > 0) & (on_rank1 < ids.shape[-1])).any()


def test_tp2_values_equal_one_process(tp2, one_process):
    """Every rank gets the one-process value of both losses and of the student's mass on S."""
    for rank, got in enumerate(tp2):
        for key in ("full", "topk", "mass"):
            assert got[key].shape == one_process[key].shape, (rank, key)
            close(got[key], one_process[key])


def test_tp2_gradients_equal_one_process(tp2, one_process):
    """The ranks' gradients wrt their logit shards, side by side, are the one-process gradient."""
    for key in ("full_grad", "topk_grad"):
        got = torch.cat([tp2[0][key], tp2[1][key]], -1)
        assert got.shape == one_process[key].shape
        close(got, one_process[key])

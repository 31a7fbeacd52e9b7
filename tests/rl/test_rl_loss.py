"""The RL objectives (GRPO, MOPD) against small hand-computed examples.

Expected numbers are worked out by hand in the comments, not by re-running the formula.
"""

import math

import pytest
import torch

from mimo_train.rl.loss import (
    distill_advantages,
    group_advantages,
    is_weights,
    policy_loss,
    sequence_token_weights,
    token_advantages,
)

D = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=D)


def leaf(values):
    return torch.tensor(values, dtype=D, requires_grad=True)


# ---------------------------------------------------------------- group advantages (GRPO)

def test_group_advantages_two_groups_of_three_by_hand():
    # group 1: [1, 0, 0]: mean 1/3, deviations (2/3, -1/3, -1/3), var (4+1+1)/27 = 2/9,
    #          std sqrt(2)/3 -> advantages (sqrt 2, -1/sqrt 2, -1/sqrt 2)
    # group 2: [3, 1, 2]: mean 2, deviations (1, -1, 0), var 2/3 -> (sqrt 1.5, -sqrt 1.5, 0)
    r = t(1.0, 0.0, 0.0, 3.0, 1.0, 2.0)
    got = group_advantages(r, 3, eps=0.0)
    s2, s15 = math.sqrt(2), math.sqrt(1.5)
    assert torch.allclose(got, t(s2, -1 / s2, -1 / s2, s15, -s15, 0.0), atol=1e-12)
    # the default eps only nudges the denominator
    assert torch.allclose(group_advantages(r, 3), got, atol=1e-5)
    # without std normalisation: only the group mean is subtracted
    plain = group_advantages(r, 3, normalize_std=False)
    assert torch.allclose(plain, t(2 / 3, -1 / 3, -1 / 3, 1.0, -1.0, 0.0), atol=1e-12)


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_with_equal_rewards_gets_exactly_zero(normalize_std, dtype):
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1.0, 0.0, 1.0], dtype=dtype)
    got = group_advantages(r, 3, normalize_std=normalize_std)
    assert torch.equal(got[:6], torch.zeros(6, dtype=got.dtype))
    assert (got[6:] != 0).all()


@pytest.mark.parametrize("n,group_size", [(5, 2), (4, 0), (4, -2)])
def test_group_size_that_does_not_divide_is_an_error(n, group_size):
    with pytest.raises(ValueError, match="group"):
        group_advantages(torch.zeros(n), group_size)


# ---------------------------------------------------------------- MOPD advantages

def test_distill_advantage_is_teacher_minus_student_and_detached():
    student = leaf([-1.5, -1.0])
    got = distill_advantages(t(-1.0, -2.0), student)
    assert torch.equal(got, t(0.5, -1.0))
    assert not got.requires_grad


def test_student_equal_to_teacher_gives_zero_advantage_loss_and_gradient():
    lp = leaf([[-0.3, -2.0, -1.1], [-0.7, -0.2, -5.0]])
    mask = t([1, 1, 1], [1, 1, 0])
    distill = distill_advantages(lp.detach().clone(), lp)
    assert torch.equal(distill, torch.zeros_like(distill))
    # alpha = 0: the outcome rewards do not count either
    adv = token_advantages(mask, distill=distill, outcome=t(1.0, -1.0), alpha=0.0)
    assert torch.equal(adv, torch.zeros_like(adv))
    loss, _ = policy_loss(lp, lp.detach(), adv, mask, sequence_token_weights(mask, 2), kind="mopd")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(lp.grad, torch.zeros_like(lp))


def test_token_advantages_combine_distill_and_outcome():
    mask = t([1, 1, 0], [1, 0, 0])
    distill = t([0.5, -1.0, float("-inf")], [2.0, 9.0, float("nan")])  # garbage on padding
    outcome = t(1.0, -2.0)
    # A = distill + 0.5 * outcome on response tokens: row 0 adds 0.5, row 1 adds -1
    got = token_advantages(mask, distill=distill, outcome=outcome, alpha=0.5)
    assert torch.equal(got, t([1.0, -0.5, 0.0], [1.0, 0.0, 0.0]))
    # a missing part counts as zero
    assert torch.equal(token_advantages(mask, distill=None, outcome=outcome, alpha=0.5),
                       t([0.5, 0.5, 0.0], [-1.0, 0.0, 0.0]))
    assert torch.equal(token_advantages(mask, distill=distill, outcome=None, alpha=0.5),
                       t([0.5, -1.0, 0.0], [2.0, 0.0, 0.0]))
    with pytest.raises(ValueError):
        token_advantages(mask, distill=None, outcome=None, alpha=1.0)


# ---------------------------------------------------------------- IS mask

def test_is_weights_drop_tokens_outside_the_bounds_instead_of_clipping():
    ratios = [0.49, 0.51, 1.0, 1.99, 2.01, 1.0]
    rollout = t(-1.0, -2.0, -0.5, -3.0, -1.0, -1.0)
    train = rollout + torch.log(torch.tensor(ratios, dtype=D))
    mask = t(1, 1, 1, 1, 1, 0)  # the last token is padding: never kept, even at ratio 1
    w, kept = is_weights(train, rollout, mask, 0.5, 2.0)
    assert torch.allclose(w, t(0.0, 0.51, 1.0, 1.99, 0.0, 0.0), atol=1e-12)
    assert kept.tolist() == [False, True, True, True, False, False]
    assert kept.dtype == torch.bool


def test_mopd_loss_and_gradient_by_hand():
    # ratios pi/mu = (0.4, 1.5, 3.0) with bounds [0.5, 2]: only the middle token is kept.
    rollout = t(-1.0, -1.0, -1.0)
    lp = (rollout + torch.log(t(0.4, 1.5, 3.0))).detach().requires_grad_(True)
    adv = t(1.0, 2.0, -1.0)
    mask = t(1, 1, 1)
    tw = torch.full((3,), 1 / 3, dtype=D)
    loss, m = policy_loss(lp, rollout, adv, mask, tw, kind="mopd")
    loss.backward()
    # loss = -(1/3) * 1.5 * 2 * log pi_1 = -(-1 + ln 1.5) = 1 - ln 1.5; d/dlp = -(1/3)*w*A
    assert loss.item() == pytest.approx(1 - math.log(1.5), abs=1e-12)
    assert torch.allclose(lp.grad, t(0.0, -1.0, 0.0), atol=1e-12)
    expect = {"tokens": 3, "is_masked": 2, "clipped": 0, "ratio": 4.9, "advantage": 2,
              "advantage_sq": 6, "kl": 0}
    for k, v in expect.items():
        assert m[k].dtype == D and m[k].dim() == 0 and not m[k].requires_grad
        assert m[k].item() == pytest.approx(v, abs=1e-12), k


# ---------------------------------------------------------------- GRPO clipping

def test_grpo_clipping_values_and_gradients_by_hand():
    # clip 0.2 -> ratios are clipped to [0.8, 1.2]; per token -min(r A, clip(r) A)
    #   r=1.5 A=+1: clipped branch, -1.2, gradient 0
    #   r=0.6 A=-1: clipped branch, +0.8, gradient 0
    #   r=1.1 A=+2: inside, -2.2, gradient -A r = -2.2
    #   r=1.5 A=-1: unclipped branch is the smaller one, +1.5, gradient -A r = +1.5
    #   r=0.6 A=+1: unclipped branch is the smaller one, -0.6, gradient -0.6
    #   r=3.0 A= 0: contributes nothing, but falls outside the IS bounds [0.5, 2] (diagnostic)
    ratios = t(1.5, 0.6, 1.1, 1.5, 0.6, 3.0)
    adv = t(1.0, -1.0, 2.0, -1.0, 1.0, 0.0)
    rollout = t(-2.0, -0.1, -1.0, -3.0, -0.5, -2.5)
    lp = (rollout + torch.log(ratios)).detach().requires_grad_(True)
    mask = torch.ones(6, dtype=D)
    loss, m = policy_loss(lp, rollout, adv, mask, torch.ones(6, dtype=D), kind="grpo")
    loss.backward()
    assert loss.item() == pytest.approx(-1.2 + 0.8 - 2.2 + 1.5 - 0.6, abs=1e-12)
    assert torch.allclose(lp.grad, t(0.0, 0.0, -2.2, 1.5, -0.6, 0.0), atol=1e-12)
    assert m["clipped"].item() == 2
    assert m["is_masked"].item() == 1
    assert m["ratio"].item() == pytest.approx(8.3, abs=1e-12)
    assert m["advantage"].item() == 2 and m["advantage_sq"].item() == 8
    assert m["tokens"].item() == 6


def test_padding_with_garbage_log_probs_gives_no_nan():
    # padded positions may hold -inf / huge numbers; they must not reach loss or gradient
    lp = leaf([[-0.5, float("-inf")], [-0.2, 50.0]])
    rollout = t([-0.5, 0.0], [-0.2, -50.0])
    adv = t([1.0, float("nan")], [-1.0, 3.0])
    mask = t([1, 0], [1, 0])
    for kind in ("grpo", "mopd"):
        lp.grad = None
        loss, m = policy_loss(lp, rollout, adv, mask, sequence_token_weights(mask, 2), kind=kind,
                              ref_logprobs=t([-0.5, 0.0], [-0.2, -80.0]))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all(), kind
        assert lp.grad[:, 1].eq(0).all()
        assert all(torch.isfinite(v) for v in m.values())
        assert m["tokens"].item() == 2 and m["is_masked"].item() == 0


# ---------------------------------------------------------------- normalisation

def test_sequence_token_weights_lengths_one_and_three():
    mask = t([1, 0, 0], [1, 1, 1])
    w = sequence_token_weights(mask, 2)
    assert torch.allclose(w, t([1 / 2, 0, 0], [1 / 6, 1 / 6, 1 / 6]), atol=1e-15)
    # an empty row (e.g. a truncated sample) gets 0, not NaN
    w3 = sequence_token_weights(t([1, 0, 0], [0, 0, 0], [1, 1, 1]), 3)
    assert torch.allclose(w3, t([1 / 3, 0, 0], [0, 0, 0], [1 / 9, 1 / 9, 1 / 9]), atol=1e-15)


def test_loss_is_mean_over_sequences_of_their_token_means():
    # on-policy (r = 1) GRPO per token is -A; lengths 1 and 3
    # -> loss = -(1/2)(A00) - (1/2)(A10 + A11 + A12)/3 = -(4/2) - (3/6) = -2.5
    mask = t([1, 0, 0], [1, 1, 1])
    lp = leaf([[-1.0, 0.0, 0.0], [-1.0, -2.0, -3.0]])
    adv = t([4.0, 9.0, 9.0], [1.0, 1.0, 1.0])
    loss, _ = policy_loss(lp, lp.detach(), adv, mask, sequence_token_weights(mask, 2), kind="grpo")
    assert loss.item() == pytest.approx(-2.5, abs=1e-12)


# ---------------------------------------------------------------- KL penalty (k3)

def test_k3_is_zero_when_policy_equals_reference():
    lp = leaf([-0.3, -1.7, -4.0])
    ones = torch.ones(3, dtype=D)
    adv = t(0.5, -1.0, 2.0)
    base, _ = policy_loss(lp, lp.detach(), adv, ones, ones, kind="grpo")
    loss, m = policy_loss(lp, lp.detach(), adv, ones, ones, kind="grpo",
                          ref_logprobs=lp.detach().clone(), kl_coef=0.5)
    assert m["kl"].item() == 0.0
    assert loss.item() == base.item()


def test_k3_values_gradient_and_sign_by_hand():
    # d = ref - logp; k3 = e^d - d - 1:  d = ln 2 -> 1 - ln 2;  d = -ln 2 -> ln 2 - 1/2
    # d k3 / d logp = 1 - e^d: -1 and +1/2.  A = 0, so only the KL term is left.
    lp = leaf([-1.0, -1.0])
    ref = t(-1.0 + math.log(2), -1.0 - math.log(2))
    ones = torch.ones(2, dtype=D)
    loss, m = policy_loss(lp, lp.detach(), torch.zeros(2, dtype=D), ones, ones * 0.5,
                          kind="grpo", ref_logprobs=ref, kl_coef=0.1)
    loss.backward()
    k3 = (1 - math.log(2)) + (math.log(2) - 0.5)
    assert m["kl"].item() == pytest.approx(k3, abs=1e-12)
    assert loss.item() == pytest.approx(0.1 * 0.5 * k3, abs=1e-12)
    assert torch.allclose(lp.grad, t(0.1 * 0.5 * -1.0, 0.1 * 0.5 * 0.5), atol=1e-12)
    # k3 >= 0 for any pair of log-probs, token by token
    g = torch.Generator().manual_seed(0)
    a, b = -5 * torch.rand(50, generator=g, dtype=D), -5 * torch.rand(50, generator=g, dtype=D)
    one = torch.ones(1, dtype=D)
    for i in range(50):
        _, mi = policy_loss(a[i:i + 1], a[i:i + 1], 0 * one, one, one, kind="grpo",
                            ref_logprobs=b[i:i + 1])
        assert mi["kl"].item() >= 0


# ---------------------------------------------------------------- bad input

def test_unknown_kind_names_the_valid_ones():
    x = torch.zeros(3, dtype=D)
    with pytest.raises(ValueError, match="grpo.*mopd"):
        policy_loss(x, x, x, x + 1, x, kind="ppo")


def test_shape_mismatch_and_kl_misuse_are_errors():
    x = torch.zeros(2, 3, dtype=D)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, x, torch.zeros(2, dtype=D), x + 1, x, kind="grpo")  # [B] vs [B, T]
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(x, x, x, x + 1, x, kind="grpo", kl_coef=0.1)
    with pytest.raises(ValueError, match="GRPO"):
        policy_loss(x, x, x, x + 1, x, kind="mopd", ref_logprobs=x, kl_coef=0.1)
    with pytest.raises(ValueError, match="outcome"):
        token_advantages(x + 1, distill=None, outcome=torch.zeros(3), alpha=1.0)

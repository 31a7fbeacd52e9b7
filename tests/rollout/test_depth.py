"""Choosing the draft depth K by measurement (rollout/depth.py): the K with the most expected
tokens per second, from step costs per (batch, K) and the running acceptance of the drafts;
followed by the engine every step, and never changing what greedy decoding produces."""

import pytest

from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from mimo_train.rollout.depth import AutoDepth, expected_tokens, measure_step_costs
from tests.rollout.rollout_utils import random_prompts
from tests.rollout.test_batching import bigram_weights

# Step seconds at K = 0..3: nearly flat at batch 1 (a step reads the weights once whatever K),
# steep at batch 8 (every drafted position costs compute).
COSTS = {1: [1.0, 1.1, 1.2, 1.3], 8: [1.0, 1.6, 2.2, 2.8]}


def test_acceptance_is_counted_per_position_over_a_prior():
    """Hand-worked. One verify step at K = 3 of four rows that kept [3, 1, 0, 2] drafts: position
    0 accepted in 3 rows, 1 in 2, 2 in 1. With a prior per-draft acceptance 0.5 (positions:
    0.5, 0.25, 0.125) worth 4 rows: (3 + 2) / 8, (2 + 1) / 8, (1 + 0.5) / 8."""
    auto = AutoDepth(COSTS, prior=0.5, prior_rows=4, memory=10 ** 9)
    assert auto.acceptance() == [0.5, 0.25, 0.125]  # nothing verified yet: the prior
    auto.observe(3, [3, 1, 0, 2])
    assert auto.acceptance() == pytest.approx([0.625, 0.375, 0.1875], abs=1e-9)
    assert expected_tokens(auto.acceptance(), 3) == pytest.approx(2.1875)


def test_older_steps_weigh_less():
    """memory = 2: each observation halves what came before it. Position 0 accepted, then
    rejected: accepted 1 x 0.5 + 0 = 0.5 of proposed 1 x 0.5 + 1 = 1.5; with a prior 0.5 worth
    one row, (0.5 + 0.5) / (1.5 + 1) = 0.4. A step at K = 1 leaves positions 1 and 2 alone."""
    auto = AutoDepth(COSTS, prior=0.5, prior_rows=1, memory=2)
    auto.observe(1, [1])
    auto.observe(1, [0])
    assert auto.acceptance() == pytest.approx([0.4, 0.25, 0.125])


def test_the_depth_with_the_most_tokens_per_second_wins():
    """With acceptance [0.625, 0.375, 0.1875] a step yields 1, 1.625, 2.0, 2.1875 tokens at
    K = 0..3. Batch 1: per second 1, 1.477, 1.667, 1.683: K = 3. Batch 8: 1, 1.016, 0.909,
    0.781: K = 1. Batch 2 interpolates 1/7 of the way to batch 8's costs (1, 1.171, 1.343,
    1.514 s): 1, 1.387, 1.489, 1.445 tokens/s, K = 2; batch 5, 4/7 of the way (1, 1.386, 1.771,
    2.157 s): K = 1; batch 20, beyond the measured sizes, takes batch 8's: K = 1."""
    auto = AutoDepth(COSTS, prior=0.5, prior_rows=4, memory=10 ** 9)
    auto.observe(3, [3, 1, 0, 2])
    assert auto.costs(2) == pytest.approx([1.0, 1.1 + 0.5 / 7, 1.2 + 1.0 / 7, 1.3 + 1.5 / 7])
    assert [auto.best(b) for b in (1, 2, 5, 8, 20)] == [3, 2, 1, 1, 1]
    rejected = AutoDepth(COSTS, prior=0.0)  # drafts never accepted: drafting only costs time
    assert [rejected.best(b) for b in (1, 8)] == [0, 0]


def test_every_depth_is_tried_again_now_and_then():
    """Every 4th choice runs another K than the best, in turn the deepest (whose drafts measure
    every position), then 0, 1, 2, skipping the best: K = 0 wins here, so 3, 1, 2, 3; when K = 3
    wins, 0, 1, 2. Otherwise a cost or an acceptance the best K never measures would never move."""
    auto = AutoDepth(COSTS, prior=0.0, explore_every=4)
    assert [auto.choose(1) for _ in range(16)] == [0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3]
    deep = AutoDepth(COSTS, prior=1.0, explore_every=4)
    assert [deep.choose(1) for _ in range(12)] == [3, 3, 3, 0, 3, 3, 3, 1, 3, 3, 3, 2]


def test_step_costs_follow_the_steps_that_run():
    """Hand-worked, cost_rate 0.5. Batch 8 at K = 1: a step of 2.6 s moves its 1.6 half-way, to
    2.1, a step of 0.1 s then to 1.1. Batch 5, never run before, starts from the costs
    interpolated 4/7 of the way from batch 1's to batch 8's (K = 0: 1.0) and a step of 3.0 s at
    K = 0 moves that to 2.0. Each batch size keeps its own costs; the measured table and the
    caller's dict are not changed."""
    auto = AutoDepth(COSTS, cost_rate=0.5)
    auto.observe_cost(8, 1, 2.6)
    assert auto.costs(8) == pytest.approx([1.0, 2.1, 2.2, 2.8])
    auto.observe_cost(8, 1, 0.1)
    auto.observe_cost(5, 0, 3.0)
    assert auto.costs(8) == pytest.approx([1.0, 1.1, 2.2, 2.8])
    assert auto.costs(5) == pytest.approx([2.0, 1.1 + 0.5 * 4 / 7, 1.2 + 1.0 * 4 / 7, 1.3 + 1.5 * 4 / 7])
    assert auto.costs(4) == pytest.approx([1.0, 1.1 + 0.5 * 3 / 7, 1.2 + 1.0 * 3 / 7, 1.3 + 1.5 * 3 / 7])
    assert auto.measured == COSTS and COSTS[8] == [1.0, 1.6, 2.2, 2.8]
    frozen = AutoDepth(COSTS, learn_costs=False)
    frozen.observe_cost(1, 0, 9.0)
    assert frozen.costs(1) == [1.0, 1.1, 1.2, 1.3]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="step costs at K = 0..Kmax"):
        AutoDepth({1: [1.0, 2.0], 2: [1.0]})
    with pytest.raises(ValueError, match="0 <= prior <= 1"):
        AutoDepth(COSTS, prior=1.5)
    with pytest.raises(ValueError, match="prior_rows > 0"):
        AutoDepth(COSTS, prior_rows=0)


def test_the_engine_refuses_auto_with_a_depth_table(parity_model):
    with pytest.raises(ValueError, match="auto_depth chooses K itself"):
        Engine(parity_model.cfg, parity_model.weights, EngineConfig(device="cpu", auto_depth=True, depth_table={1: 3}))


def wrong_drafts(model) -> dict:
    """The bigram model whose MTP layers read the token's embedding negated: each draft is the
    token the main model scores lowest, so no draft is ever accepted."""
    w = bigram_weights(model)
    for k in range(model.cfg.num_nextn_predict_layers):
        w[f"model.mtp.layers.{k}.eh_proj.weight"] = -w[f"model.mtp.layers.{k}.eh_proj.weight"]
    return w


FLAT = {1: [1.0, 1.2, 1.4, 1.6], 2: [1.0, 1.4, 1.8, 2.2]}  # drafting is cheap at batch 1


@pytest.mark.parametrize("drafts", ["right", "wrong"])
def test_the_engine_follows_the_drafts_it_sees(parity_model, drafts):
    """Right drafts (the bigram model), from a pessimistic prior (0.3 per draft): the engine
    starts shallow and ends drafting at K = 3 most of the time. Wrong drafts, from an optimistic
    prior (0.7): it starts at K = 3 and ends at K = 0 but for an exploration step every 16.
    Greedy tokens are plain decoding's (K = 0) either way."""
    weights = bigram_weights(parity_model) if drafts == "right" else wrong_drafts(parity_model)
    engine = Engine(parity_model.cfg, weights, EngineConfig(device="cpu", max_batch=2, max_len=256))
    prompt = random_prompts(parity_model.cfg, [5], seed=3)[0]
    params = SamplingParams(temperature=0.0, max_new_tokens=120)
    (plain,), _ = engine.generate([prompt], params, depth=0)
    engine.auto = AutoDepth(FLAT, prior=0.3 if drafts == "right" else 0.7, explore_every=16, learn_costs=False)
    first = engine.auto.best(1)
    (auto,), metrics = engine.generate([prompt], params)
    assert auto.tokens == plain.tokens
    steps = metrics.depth_steps
    if drafts == "right":
        assert first < 3 and steps[3] > 0.5 * metrics.steps and engine.auto.best(1) == 3
        assert engine.auto.acceptance()[0] > 0.9
    else:
        assert first == 3 and steps[0] > 0.75 * metrics.steps and engine.auto.best(1) == 0
        assert engine.auto.acceptance()[0] < 0.1


def test_costly_drafts_are_left_out(parity_model):
    """The same drafts, all right, but each drafted position costs two plain steps: K = 0 wins
    (tokens per second 1, 2/3, 3/5, 4/7); other depths run only on exploration steps."""
    engine = Engine(parity_model.cfg, bigram_weights(parity_model), EngineConfig(device="cpu", max_batch=2, max_len=128))
    engine.auto = AutoDepth({1: [1.0, 3.0, 5.0, 7.0]}, prior=1.0, explore_every=8, learn_costs=False)
    prompt = random_prompts(parity_model.cfg, [5], seed=3)[0]
    _, metrics = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=40))
    assert metrics.depth_steps[0] == metrics.steps - metrics.steps // 8  # every 8th step explores another K


def test_a_wrong_start_up_cost_is_corrected_by_the_steps_that_run(parity_model, monkeypatch):
    """Drafts never accepted, and a start-up table that claims a K = 3 step costs a hundredth of
    what it does: auto starts at K = 3, but the K = 3 steps' own times raise its cost within a
    few steps, and K = 0 (the fastest) runs most of the time. The engine's clock is a fake one on
    which a decode step at K takes (1 + K) ms: the test does not depend on this machine's load."""
    import mimo_train.rollout.engine as engine_module

    engine = Engine(parity_model.cfg, wrong_drafts(parity_model), EngineConfig(device="cpu", max_batch=2, max_len=256))
    clock = [0.0]
    monkeypatch.setattr(engine_module.time, "perf_counter", lambda: clock[0])
    decode = engine.state.decode

    def timed_decode(n, K, *args):
        clock[0] += 1e-3 * (1 + K)
        return decode(n, K, *args)

    monkeypatch.setattr(engine.state, "decode", timed_decode)
    true = [1e-3 * (1 + k) for k in range(4)]
    engine.auto = AutoDepth({1: true[:3] + [true[3] / 100], 2: true[:3] + [true[3] / 100]}, prior=0.7)
    assert engine.auto.best(1) == 3
    prompt = random_prompts(parity_model.cfg, [5], seed=3)[0]
    _, metrics = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=120))
    assert metrics.depth_steps[0] > 0.75 * metrics.steps and engine.auto.best(1) == 0
    assert engine.auto.costs(1)[3] > 0.5 * true[3]  # up from true / 100


def test_auto_depth_times_the_steps_at_start_up(parity_model):
    """Measured on this machine before the first request, the engine left idle: one cost per
    K = 0..3 for batches 1, 2 and max_batch 3; then it serves as usual."""
    engine = Engine(parity_model.cfg, parity_model.weights,
                    EngineConfig(device="cpu", max_batch=3, max_len=64, auto_depth=True))
    assert sorted(engine.auto.measured) == [1, 2, 3]
    assert all(len(s) == 4 and all(t > 0 for t in s) for s in engine.auto.measured.values())
    assert engine.n == 0 and not engine.waiting
    completions, _ = engine.generate(random_prompts(parity_model.cfg, [5], seed=1), SamplingParams(max_new_tokens=4))
    assert len(completions[0].tokens) == 4

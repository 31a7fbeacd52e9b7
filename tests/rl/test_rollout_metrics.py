"""The RL loop's drafting metrics per domain: accept length and per-position acceptance pooled
over each domain's verify steps, from the samples' own draft counts (tokens that reached them)."""

import pytest
import torch

from mimo_train.rl.loop import draft_metrics
from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from mimo_train.rollout.api import DraftCounts
from tests.rollout.rollout_utils import make_model, random_prompts


def test_per_domain_figures_pool_each_domains_verify_steps():
    """Hand-worked. math: a sample of 3 verify steps that took 7 tokens, 3 drafts proposed
    at each position and [2, 1, 1] accepted, and one of 1 step, 1 token, none accepted:
    (7 + 1) / (3 + 1) = 2.0 tokens per step, acceptance [2/4, 1/4, 1/4]. code: drafted at
    depth 1 only, 2 steps and 3 tokens: 1.5, and no position-1 or -2 figure (nothing drafted
    there, so no rate to report). A sample without counts (a vLLM one) adds nothing."""
    counts = {"math": [DraftCounts(3, 7, [3, 3, 3], [2, 1, 1]), DraftCounts(1, 1, [1, 1, 1], [0, 0, 0])],
              "code": [DraftCounts(2, 3, [2, 0, 0], [1, 0, 0]), None]}
    domains = [d for d, cs in counts.items() for _ in cs]
    got = draft_metrics(domains, [c for cs in counts.values() for c in cs])
    assert got == {"rollout/accept_length/code": 1.5, "rollout/acceptance_0/code": 0.5,
                   "rollout/accept_length/math": 2.0, "rollout/acceptance_0/math": 0.5,
                   "rollout/acceptance_1/math": 0.25, "rollout/acceptance_2/math": 0.25}
    assert draft_metrics(["math", "code"], [None, None]) == {}  # vLLM: no per-request counts, no figures


@pytest.fixture(scope="module")
def engine(tmp_path_factory, one_thread):
    model = make_model(tmp_path_factory.mktemp("drafting"), seed=2, repeat_drafts=True)
    return model, Engine(model.cfg, model.weights, EngineConfig(device="cpu", max_batch=4, max_len=96))


def test_the_domains_together_give_the_engines_own_figures(engine):
    """The per-request counts and the engine's call metrics are kept apart; pooled over every
    sample (one domain) they must agree, and split by domain each domain sees only its samples.
    Samples end at stop tokens and length limits, at K = 3."""
    model, eng = engine
    prompts = random_prompts(model.cfg, [5, 9, 6, 12], seed=4)
    params = [SamplingParams(temperature=0.0, max_new_tokens=n, stop_token_ids=stop)
              for n, stop in ((30, (72,)), (30, (26,)), (17, ()), (9, ()))]
    completions, metrics = eng.generate(prompts, params, depth=3)
    assert [c.finish_reason for c in completions] == ["stop", "stop", "length", "length"]
    counts = [c.drafts for c in completions]
    pooled = draft_metrics(["all"] * len(completions), counts)
    assert pooled["rollout/accept_length/all"] == pytest.approx(metrics.mean_accept_length)
    assert [pooled[f"rollout/acceptance_{j}/all"] for j in range(3)] == pytest.approx(metrics.acceptance_per_position)
    assert 1.0 < metrics.mean_accept_length < 4.0  # drafts were kept and rejected

    split = draft_metrics(["a", "b", "a", "b"], counts)
    for domain, rows in (("a", [0, 2]), ("b", [1, 3])):
        mine = DraftCounts.total(counts[i] for i in rows)
        assert split[f"rollout/accept_length/{domain}"] == mine.tokens / mine.steps
        assert sum(len(completions[i].tokens) - 1 for i in rows) == mine.tokens  # all but the prefill's token


def test_an_rl_run_with_auto_depth_stays_on_policy(rl_data, student_init, teacher_init, megatron_single, tmp_path):
    """rl.spec_depth=auto: the engine times its steps, then picks K every decode step; whatever
    K it picks, the samples' log-probs are the trainer's (ratio 1, nothing masked: speculative
    sampling is lossless at every depth) and the run reports the depth it drafted at."""
    from tests.rl.rl_runs import mopd_args
    from tests.training.runs import metrics, train_here

    train_here(mopd_args(rl_data, tmp_path, student_init, teacher_init, "rl.spec_depth=auto"))
    rows = metrics(tmp_path)
    assert sorted(rows) == [1, 2]
    for row in rows.values():
        assert abs(row["rl/ratio_mean"] - 1) < 1e-4 and row["rl/is_masked_fraction"] == 0
        assert 0 <= row["rollout/mean_depth"] <= 3 and "rollout/accept_length" in row


@pytest.mark.parametrize("depth", ["auto", "2"])
def test_the_native_backend_builds_the_engine_the_setting_asks_for(depth):
    """rl.spec_depth=auto: an engine that times its steps and chooses K itself; a number: a
    fixed K and no auto (so the run above would not pass by drafting at a fixed depth)."""
    from mimo_train.rl.rollout_backend import NativeRollout
    from mimo_train.rollout import weights as weight_io
    from mimo_train.training.config import load_config

    config = load_config(["recipe=grpo", "model=tiny", "train.global_batch=8", "rl.prompts_per_step=4",
                          "rl.group_size=2", f"rl.spec_depth={depth}"])
    backend = NativeRollout(config, max_len=64)
    weights = dict(weight_io.allocate(config.model, torch.device("cpu"), torch.float32).views)
    backend._load(weights, version=1)
    engine = backend.engine
    if depth == "auto":
        assert engine.auto is not None and engine.fixed_depth is None and sorted(engine.auto.measured) == [1, 2, 4, 8]
    else:
        assert engine.auto is None and engine.fixed_depth == 2

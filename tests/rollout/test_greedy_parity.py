"""Greedy decoding equals transformers' greedy `generate` with the same weights, token for token,
at every speculative depth K = 0..3, for prompts longer than the sliding window and 200+ new
tokens (so the SWA ring buffers wrap many times and rejected drafts are rolled back often)."""

import pytest

from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from tests.rollout.rollout_utils import hf_greedy, random_prompts

NEW_TOKENS = 200


@pytest.fixture(scope="module")
def reference(parity_model):
    cfg = parity_model.cfg
    prompts = random_prompts(cfg, [3 * cfg.sliding_window_size + 2, cfg.sliding_window_size + 4], seed=0)
    assert all(len(p) > cfg.sliding_window_size + 1 for p in prompts)
    return prompts, [hf_greedy(parity_model.hf, p, NEW_TOKENS) for p in prompts]


@pytest.fixture(scope="module")
def engine(parity_model):
    return Engine.from_pretrained(parity_model.path, EngineConfig(device="cpu", max_batch=4, max_len=512))


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_greedy_equals_transformers_generate(engine, reference, depth):
    prompts, expected = reference
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    completions, metrics = engine.generate(prompts, params, depth=depth)
    for c, want in zip(completions, expected):
        assert c.tokens == want
        assert c.finish_reason == "length"
    assert metrics.depth_steps == {depth: metrics.steps}
    if depth:
        # Drafts at every position were accepted and others rejected: both paths ran.
        assert len(metrics.acceptance_per_position) == depth
        assert all(0 < a < 1 for a in metrics.acceptance_per_position)
        assert metrics.mean_accept_length > 1.1

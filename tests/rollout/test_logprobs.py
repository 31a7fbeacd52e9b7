"""The log-probs the engine returns are the target's: log_softmax(logits / T) of each sampled
token, as one full forward over prompt + completion recomputes them (within 1e-5, fp32), at
every depth, with and without top-k / top-p (which shape sampling, not the reported log-probs)."""

import pytest
import torch

from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from tests.rollout.rollout_utils import full_forward_logits, random_prompts


@pytest.fixture(scope="module")
def engine(parity_model):
    return Engine.from_pretrained(parity_model.path, EngineConfig(device="cpu", max_batch=4, max_len=256))


@pytest.mark.parametrize("depth,params", [
    (3, SamplingParams(temperature=0.8, max_new_tokens=40, n=2, seed=7)),
    (1, SamplingParams(temperature=1.3, top_k=20, top_p=0.8, max_new_tokens=40, seed=8)),
    (0, SamplingParams(temperature=1.0, max_new_tokens=40, seed=9)),
    (2, SamplingParams(temperature=0.0, max_new_tokens=40)),
])
def test_logprobs_equal_full_forward(engine, parity_model, depth, params):
    cfg = parity_model.cfg
    prompts = random_prompts(cfg, [2 * cfg.sliding_window_size + 1, 3], seed=3)
    completions, _ = engine.generate(prompts, params, depth=depth)
    assert len(completions) == len(prompts) * params.n
    t = params.temperature if params.temperature > 0 else 1.0
    for c in completions:
        assert len(c.logprobs) == len(c.tokens) > 0
        logits = full_forward_logits(parity_model.hf, c.prompt, c.tokens)
        expected = (logits / t).log_softmax(-1).gather(1, torch.tensor(c.tokens)[:, None]).squeeze(1)
        assert (torch.tensor(c.logprobs, dtype=torch.float64) - expected).abs().max().item() <= 1e-5

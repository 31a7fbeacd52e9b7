"""Bad input is refused with an error that says what is wrong, and the engine keeps serving:
requests already in flight finish exactly as they would have without the interruption."""

import math

import pytest
import torch

from mimo_train.model.hf_mapping import WeightNameError
from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from tests.rollout.rollout_utils import random_prompts

MAX_LEN = 64


@pytest.fixture(scope="module")
def engine(parity_model):
    return Engine.from_pretrained(parity_model.path, EngineConfig(device="cpu", max_batch=2, max_len=MAX_LEN))


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=math.nan), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(top_k=2.5), "top_k must be an int >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(n=0), "n must be an int >= 1"),
    (dict(seed="7"), "seed must be an int or None"),
    (dict(stop_token_ids=(-3,)), "stop_token_ids must be ints >= 0"),
])
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def bad_requests(cfg):
    return {
        "empty prompt": ([], SamplingParams()),
        "does not fit: max length is 64": (list(range(3)) * 30, SamplingParams()),
        "outside \\[0, ": ([1, 2, cfg.vocab_size], SamplingParams()),
        "not strings": ("hello", SamplingParams()),
        "stop_token_ids outside the vocabulary": ([1, 2], SamplingParams(stop_token_ids=(cfg.vocab_size + 5,))),
        "params must be SamplingParams": ([1, 2], {"temperature": 1.0}),
    }


def test_bad_requests_leave_requests_in_flight_untouched(engine, parity_model):
    cfg = parity_model.cfg
    prompts = random_prompts(cfg, [10, 6, 12], seed=21)
    params = SamplingParams(temperature=0.9, max_new_tokens=30, seed=5)
    undisturbed, _ = engine.generate(prompts, params, depth=2)

    # The same requests through the step API, interrupted by every kind of bad input.
    engine.fixed_depth = 2
    for i, p in enumerate(prompts):
        engine.add_request(p, params, prompt_index=i)
    done = engine.step() + engine.step()
    for message, (prompt, bad_params) in bad_requests(cfg).items():
        with pytest.raises(ValueError, match=message):
            engine.add_request(prompt, bad_params)
        done += engine.step()
    with pytest.raises(WeightNameError, match="unknown name"):
        engine.update_weights({"lm_head.bias": torch.zeros(cfg.vocab_size)})
    with pytest.raises(WeightNameError, match="shape"):
        engine.update_weights({"lm_head.weight": torch.zeros(cfg.vocab_size + 1, cfg.hidden_size)})
    while engine.n or engine.waiting:
        done += engine.step()
    engine.fixed_depth = None
    assert [c.tokens for c in sorted(done, key=lambda c: c.prompt_index)] == [c.tokens for c in undisturbed]
    assert engine.version == 0


def test_generate_checks_every_prompt_before_queueing(engine, parity_model):
    prompts = random_prompts(parity_model.cfg, [5, 5], seed=1) + [[]]
    with pytest.raises(ValueError, match="prompt 2: empty prompt"):
        engine.generate(prompts, SamplingParams(max_new_tokens=3))
    assert not engine.waiting and engine.n == 0
    with pytest.raises(ValueError, match="depth must be in"):
        engine.generate(prompts[:2], SamplingParams(max_new_tokens=3), depth=parity_model.cfg.num_nextn_predict_layers + 1)
    with pytest.raises(ValueError, match="list of token-id lists"):
        engine.generate(prompts[0], SamplingParams(max_new_tokens=3))
    completions, _ = engine.generate(prompts[:2], SamplingParams(max_new_tokens=3))  # still serving
    assert [len(c.tokens) for c in completions] == [3, 3]


def test_generation_stops_at_max_length(engine, parity_model):
    prompt = random_prompts(parity_model.cfg, [MAX_LEN - 5], seed=2)[0]
    (c,), _ = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=50), depth=3)
    assert c.finish_reason == "length" and len(prompt) + len(c.tokens) == MAX_LEN

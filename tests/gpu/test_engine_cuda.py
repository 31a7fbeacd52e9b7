"""GPU lane: the rollout engine on CUDA. In fp32 its greedy tokens are transformers' greedy
tokens (on the same GPU) at every speculative depth; in bf16 (the GPU default) it decodes with
drafts accepted, and its greedy tokens agree with its own fp32 ones until bf16 rounding first
flips a near-tie."""

import pytest
import torch

from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from tests.rollout.rollout_utils import make_model, random_prompts

pytestmark = pytest.mark.gpu
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("cuda_parity"), seed=2, repeat_drafts=True)


@pytest.fixture(scope="module")
def prompts(model):
    w = model.cfg.sliding_window_size
    return random_prompts(model.cfg, [3 * w + 2, w + 4], seed=0)


@pytest.mark.parametrize("depth", [0, 3])
def test_fp32_greedy_equals_transformers_on_cuda(model, prompts, depth):
    hf = model.hf.to("cuda")
    expected = [hf_greedy_cuda(hf, p) for p in prompts]
    engine = Engine.from_pretrained(model.path, EngineConfig(device="cuda", dtype=torch.float32, max_batch=4,
                                                             max_len=256))
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    completions, metrics = engine.generate(prompts, params, depth=depth)
    assert [c.tokens for c in completions] == expected
    if depth:
        assert metrics.mean_accept_length > 1.0


def test_bf16_decodes_with_drafts(model, prompts):
    engine = Engine.from_pretrained(model.path, EngineConfig(device="cuda", max_batch=4, max_len=256))
    assert engine.dtype == torch.bfloat16
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    plain, _ = engine.generate(prompts, params, depth=0)
    spec, metrics = engine.generate(prompts, params, depth=3)
    assert metrics.mean_accept_length > 1.0
    # Lossless up to rounding: the same tokens as plain decoding, at least until the first
    # near-tie that the verify forward (K + 1 positions at once) rounds differently.
    same = [next((i for i, (a, b) in enumerate(zip(p.tokens, s.tokens)) if a != b), NEW_TOKENS)
            for p, s in zip(plain, spec)]
    print(f"bf16: tokens equal to plain decoding before the first difference: {same}")
    assert min(same) >= 8


def hf_greedy_cuda(hf, prompt):
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()



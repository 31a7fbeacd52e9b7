"""Continuous batching, samples per prompt, seeds, stop tokens, routed experts, the depth table
and the metrics of a call."""

import pytest
import torch

from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from tests.rollout.rollout_utils import random_prompts


@pytest.fixture(scope="module")
def engine(parity_model):
    return Engine.from_pretrained(parity_model.path, EngineConfig(device="cpu", max_batch=3, max_len=128))


def test_finished_requests_free_their_slots(engine, parity_model):
    """7 requests of different lengths through 3 slots: each gets exactly what it gets alone."""
    prompts = random_prompts(parity_model.cfg, [4, 11, 7, 15, 5, 9, 12], seed=6)
    params = [SamplingParams(temperature=0.0, max_new_tokens=n) for n in (5, 30, 12, 3, 25, 8, 17)]
    completions, metrics = engine.generate(prompts, params, depth=2)
    alone = [engine.generate([p], sp, depth=2)[0][0].tokens for p, sp in zip(prompts, params)]
    assert [c.tokens for c in completions] == alone
    assert [len(c.tokens) for c in completions] == [sp.max_new_tokens for sp in params]
    assert 0.5 < metrics.occupancy <= 1.0
    assert metrics.tokens == sum(sp.max_new_tokens for sp in params)
    assert 1.0 <= metrics.mean_accept_length <= 3.0 and len(metrics.acceptance_per_position) == 2
    assert metrics.tokens_per_s > 0 and metrics.steps > 0 and metrics.prefill_tokens == sum(map(len, prompts))


def test_seeded_samples_do_not_depend_on_the_batch(parity_model):
    """Per-request random streams: the same call gives the same samples however many slots run
    at once (so whatever shares a batch with a request)."""
    prompts = random_prompts(parity_model.cfg, [6, 9], seed=7)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=20, n=3, seed=2024)
    outs = []
    for slots in (1, 6):
        engine = Engine(parity_model.cfg, parity_model.weights, EngineConfig(device="cpu", max_batch=slots, max_len=64))
        completions, _ = engine.generate(prompts, params, depth=1)
        outs.append([(c.prompt_index, c.sample_index, c.tokens) for c in completions])
    assert outs[0] == outs[1]
    assert [(p, s) for p, s, _ in outs[0]] == [(p, s) for p in range(2) for s in range(3)]
    assert len({tuple(t) for _, _, t in outs[0]}) == 6  # the samples differ


def test_stop_tokens_end_a_request(engine, parity_model):
    prompt = random_prompts(parity_model.cfg, [8], seed=8)[0]
    (free,), _ = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=40), depth=3)
    stop = free.tokens[10]
    (c,), _ = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=40, stop_token_ids=(stop,)),
                              depth=3)
    cut = free.tokens.index(stop) + 1
    assert c.finish_reason == "stop" and c.tokens == free.tokens[:cut] and c.logprobs == free.logprobs[:cut]


def test_routed_experts_match_transformers_router(engine, parity_model):
    """The experts recorded per token and MoE layer are the ones transformers' router picks in a
    full forward over prompt + completion (the routing replay data)."""
    prompt = random_prompts(parity_model.cfg, [9], seed=9)[0]
    (c,), _ = engine.generate([prompt], SamplingParams(temperature=1.0, max_new_tokens=20, seed=1,
                                                       return_routed_experts=True), depth=3)
    cfg = parity_model.cfg
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)]
    assert c.routed_experts.shape == (len(prompt) + len(c.tokens) - 1, len(moe_layers), cfg.num_experts_per_tok)
    chosen = []
    hooks = [parity_model.hf.model.layers[i].mlp.gate.register_forward_hook(lambda m, a, out: chosen.append(out[2]))
             for i in moe_layers]
    with torch.no_grad():
        parity_model.hf(torch.tensor([prompt + c.tokens[:-1]]))
    for h in hooks:
        h.remove()
    expected = torch.stack(chosen, dim=1).sort(-1).values
    assert torch.equal(c.routed_experts.sort(-1).values, expected)


def test_depth_follows_the_table(parity_model):
    engine = Engine(parity_model.cfg, parity_model.weights,
                    EngineConfig(device="cpu", max_batch=4, max_len=64, depth_table={1: 3, 2: 2, 4: 0}))
    assert [engine.depth_for(b) for b in (1, 2, 3, 4, 9)] == [3, 2, 0, 0, 0]
    prompts = random_prompts(parity_model.cfg, [5, 5, 5], seed=10)
    params = [SamplingParams(temperature=0.0, max_new_tokens=n) for n in (4, 8, 30)]
    _, metrics = engine.generate(prompts, params)
    assert set(metrics.depth_steps) == {0, 2, 3}  # three, then two, then one request left
    with pytest.raises(ValueError, match="depth_table"):
        Engine(parity_model.cfg, parity_model.weights, EngineConfig(device="cpu", depth_table={1: 4}))


def bigram_weights(model) -> dict[str, torch.Tensor]:
    """The model with every attention and FFN output zeroed: the residual stream is the token's
    embedding, so the next token is a fixed function of the last one. Each MTP layer keeps only
    its token input (eh_proj = [I, 0]) and the main model's final norm, so layer k drafts that
    same function of the token it reads: every draft is right and every verify keeps K + 1."""
    w, hidden = dict(model.weights), model.cfg.hidden_size
    for name in w:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w[name] = torch.zeros_like(w[name])
    for k in range(model.cfg.num_nextn_predict_layers):
        layer = f"model.mtp.layers.{k}."
        w[f"{layer}eh_proj.weight"] = torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], 1)
        w[f"{layer}enorm.weight"] = torch.ones(hidden)
        w[f"{layer}final_layernorm.weight"] = w["model.norm.weight"]
    return w


@pytest.mark.parametrize("limit", ["stop token", "max_new_tokens"])
def test_metrics_count_only_tokens_the_request_takes(parity_model, limit):
    """Every draft is accepted (K = 3: each verify yields 4 tokens), and the request ends at its
    7th token: the prefill gives token 0, verify 1 tokens 1-4, verify 2 tokens 5-8 of which it
    takes 5 and 6 (a stop token, or max_new_tokens = 7). Hand-worked: 2 verify steps, 4 + 2 = 6
    tokens taken from them (accept length 3, not 4); drafts proposed [2, 2, 2], accepted and
    taken [2, 2, 1] (verify 2's draft 1 is token 6; its draft 2, token 7, was accepted but never
    reached the request)."""
    engine = Engine(parity_model.cfg, bigram_weights(parity_model), EngineConfig(device="cpu", max_batch=2, max_len=64))
    prompt = random_prompts(parity_model.cfg, [5], seed=3)[0]
    (free,), free_metrics = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=13), depth=3)
    assert free_metrics.mean_accept_length == 4.0 and free_metrics.acceptance_per_position == [1.0, 1.0, 1.0]
    assert len(set(free.tokens[:7])) == 7  # token 6 appears first at index 6: a stop token there ends it there
    params = (SamplingParams(temperature=0.0, max_new_tokens=40, stop_token_ids=(free.tokens[6],))
              if limit == "stop token" else SamplingParams(temperature=0.0, max_new_tokens=7))
    (c,), metrics = engine.generate([prompt], params, depth=3)
    assert c.tokens == free.tokens[:7] and c.finish_reason == ("stop" if limit == "stop token" else "length")
    assert (c.drafts.steps, c.drafts.tokens, c.drafts.proposed, c.drafts.accepted) == (2, 6, [2, 2, 2], [2, 2, 1])
    assert c.drafts.accept_length == 3.0 and c.drafts.acceptance_per_position == [1.0, 1.0, 0.5]
    assert metrics.steps == metrics.row_steps == 2 and metrics.tokens == 7
    assert metrics.mean_accept_length == 3.0 and metrics.acceptance_per_position == [1.0, 1.0, 0.5]

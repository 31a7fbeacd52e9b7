"""Speculative sampling is lossless: with K = 3 drafts from (random, hence poor) MTP layers, the
tokens at the verified positions follow exactly the distribution of plain sampling from the
target. The expected distribution is enumerated exactly from transformers' forward (a 6-token
vocabulary makes every continuation of 3 tokens one batch); a chi-square test at a fixed seed
compares it with the engine's samples. The same test run with a wrong acceptance rule
(min(1, q/p)) or without residual resampling fails, so it has the power to catch them."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from mimo_train.kernels import sampling
from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from tests.rollout.rollout_utils import random_prompts

SAMPLES = 1200
POSITIONS = (1, 2, 3)  # 0-based: token 0 comes from the prefill, tokens 1-4 from the first verify


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The target distribution written plainly, row by row (independent of kernels/sampling)."""
    out = torch.zeros_like(logits)
    for i, row in enumerate(logits / params.temperature):
        order = row.argsort(descending=True).tolist()
        if params.top_k:
            order = order[:params.top_k]
        probs = row[order].softmax(-1)
        kept, mass = [], 0.0
        for tok, p in zip(order, probs.tolist()):
            if mass >= params.top_p:
                break
            kept.append(tok)
            mass += p
        out[i, kept] = row[kept].softmax(-1)
    return out


def exact_marginals(hf, prompt, vocab, params, depth=4):
    """P(token j = x) for j < depth, and the joint of tokens 1 and 2, by enumeration."""
    prefixes = torch.tensor(list(itertools.product(range(vocab), repeat=depth - 1)))
    ids = torch.cat([torch.tensor(prompt).expand(len(prefixes), -1), prefixes], dim=1)
    with torch.no_grad():
        logits = hf(ids).logits[:, len(prompt) - 1:].double()  # [V^(d-1), d, V]
    cond = filtered_probs(logits.reshape(-1, vocab), params).view(len(prefixes), depth, vocab)
    # P(prefix) for each row, then the joint of all `depth` tokens.
    path = torch.ones(len(prefixes), dtype=torch.float64)
    for j in range(depth - 1):
        path = path * cond[:, j].gather(1, prefixes[:, j:j + 1]).squeeze(1)
    joint = (path[:, None] * cond[:, depth - 1]).view(*([vocab] * depth))
    marginals = [joint.sum(dim=[d for d in range(depth) if d != j]) for j in range(depth)]
    return marginals, joint.sum(dim=[0, 3])


def pvalue(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; cells expecting < 5 samples are pooled."""
    expected = expected_probs.flatten() * observed.sum()
    observed = observed.flatten().double()
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]]) if small.any() else observed
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy() * obs[keep].sum().item() / exp[keep].sum().item()).pvalue)


def pvalues(engine, tiny_model, params):
    cfg = tiny_model.cfg
    prompt = random_prompts(cfg, [2 * cfg.sliding_window_size + 3], seed=5)[0]
    completions, metrics = engine.generate([prompt], params, depth=3)
    assert len(completions) == SAMPLES and metrics.acceptance_per_position[0] > 0.1
    tokens = torch.tensor([c.tokens for c in completions])
    marginals, pair = exact_marginals(tiny_model.hf, prompt, cfg.vocab_size, params)
    ps = [pvalue(torch.bincount(tokens[:, j], minlength=cfg.vocab_size), marginals[j]) for j in POSITIONS]
    pair_counts = torch.bincount(tokens[:, 1] * cfg.vocab_size + tokens[:, 2], minlength=cfg.vocab_size ** 2)
    return ps + [pvalue(pair_counts, pair)]


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine.from_pretrained(tiny_model.path, EngineConfig(device="cpu", max_batch=64, max_len=64))


PARAMS = {
    "plain": SamplingParams(temperature=1.0, max_new_tokens=4, n=SAMPLES, seed=1234, ignore_eos=True),
    "filtered": SamplingParams(temperature=0.7, top_k=4, top_p=0.9, max_new_tokens=4, n=SAMPLES, seed=99,
                               ignore_eos=True),
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_speculative_samples_follow_the_target(engine, tiny_model, name):
    ps = pvalues(engine, tiny_model, PARAMS[name])
    assert min(ps) > 1e-3, ps


@pytest.mark.parametrize("broken", ["accept min(1, q/p)", "no residual resampling"])
def test_a_wrong_rule_is_caught(engine, tiny_model, monkeypatch, broken):
    if broken.startswith("accept"):
        monkeypatch.setattr(sampling, "accept_draft", lambda p, q, u: u * p < q)
    else:
        monkeypatch.setattr(sampling, "residual", lambda p, q: p)
    ps = pvalues(engine, tiny_model, PARAMS["plain"])
    assert min(ps) < 1e-6, ps

"""The CPU path of short queries without grad (the engine's decode and verify steps) equals the
reference: GQA by grouped query heads, sinks as one more logit column, the masking rule either
recomputed or handed in once per step."""

import importlib

import pytest
import torch

from mimo_train.kernels.attention import attention, attention_grouped, attention_reference, hidden_keys


def _cache_inputs(gen, b, sq, sk, heads, kv_heads, dk=12, dv=8):
    q = torch.randn(b, sq, heads, dk, generator=gen)
    k = torch.randn(b, sk, kv_heads, dk, generator=gen)
    v = torch.randn(b, sk, kv_heads, dv, generator=gen)
    # Cache slots hold scattered positions (a ring), some empty (-1); each row at its own length.
    last = torch.randint(sq, sk + 5, (b, 1), generator=gen)
    q_pos = last - sq + 1 + torch.arange(sq)
    k_pos = torch.stack([torch.randperm(sk + 5, generator=gen)[:sk] for _ in range(b)])
    k_pos[torch.rand(b, sk, generator=gen) < 0.2] = -1
    return q, k, v, q_pos, k_pos


@pytest.mark.parametrize("b,sq,sk,heads,kv_heads,window,sinks", [
    (1, 1, 9, 4, 2, 4, True), (3, 4, 20, 6, 1, None, False), (2, 4, 33, 8, 8, 7, True), (16, 3, 12, 4, 2, 2, True),
])
def test_grouped_equals_the_reference(b, sq, sk, heads, kv_heads, window, sinks):
    gen = torch.Generator().manual_seed(b * 100 + sk)
    q, k, v, q_pos, k_pos = _cache_inputs(gen, b, sq, sk, heads, kv_heads)
    s = torch.randn(heads, generator=gen) * 2 if sinks else None
    kw = dict(scale=0.3, q_pos=q_pos, k_pos=k_pos, sinks=s, window=window)
    ref_out, ref_lse = attention_reference(q, k, v, **kw)
    for hidden in (None, hidden_keys(q_pos, k_pos, window=window)):
        out, lse = attention_grouped(q, k, v, hidden=hidden, **kw)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-6)


def test_a_query_that_sees_nothing_gets_zero_not_nan():
    gen = torch.Generator().manual_seed(0)
    q, k, v, q_pos, k_pos = _cache_inputs(gen, 2, 3, 10, 4, 2)
    q_pos[0] = -1  # padding queries: no key is at or before them
    out, lse = attention_grouped(q, k, v, scale=0.3, q_pos=q_pos, k_pos=k_pos)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    torch.testing.assert_close(out[1], attention_reference(q, k, v, scale=0.3, q_pos=q_pos, k_pos=k_pos)[0][1])


def test_the_dispatcher_takes_it_on_cpu_only_for_short_queries_without_grad(monkeypatch):
    monkeypatch.delenv("MIMO_ATTENTION_BACKEND", raising=False)
    calls = []
    module = importlib.import_module("mimo_train.kernels.attention")  # the package re-exports the function

    monkeypatch.setattr(module, "attention_grouped", lambda *a, **kw: calls.append(1) or attention_reference(
        *a, **{key: val for key, val in kw.items() if key != "hidden"}))
    gen = torch.Generator().manual_seed(1)
    q, k, v, q_pos, k_pos = _cache_inputs(gen, 1, 4, 12, 4, 2)
    attention(q, k, v, scale=0.3, q_pos=q_pos, k_pos=k_pos)
    assert calls == [1]
    attention(q.requires_grad_(), k, v, scale=0.3, q_pos=q_pos, k_pos=k_pos)  # training: the reference
    q_long, k_long, v_long, qp, kp = _cache_inputs(gen, 1, 17, 30, 4, 2)
    attention(q_long, k_long, v_long, scale=0.3, q_pos=qp, k_pos=kp)  # prefill-length query: the reference
    assert calls == [1]

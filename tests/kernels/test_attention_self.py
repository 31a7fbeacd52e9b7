"""The training attention on CPU (`attention_self`: grouped query heads, one softmax, no
log-sum-exp) and its banded form for sliding windows (`attention_banded`: each block of
queries against only the keys its window reaches) compute what the reference computes: outputs
and gradients of q, k, v and the sinks, for global and sliding-window layers, GQA, packed
segments and long packed rows; and the dispatcher sends training (lse=False, self-attention)
there."""

import importlib

import pytest
import torch

from tests.kernels.attention_utils import packed_row
from mimo_train.kernels.attention import attention, attention_banded, attention_reference, attention_self


def _grads(out, weights, params):
    return torch.autograd.grad((out * weights).sum(), params)


@pytest.mark.parametrize("heads,kv_heads,window,sinks,lengths", [
    (6, 1, None, False, [40]),            # global layer: MQA, no sinks
    (6, 2, 7, True, [40]),                # SWA layer: GQA, window, sinks
    (4, 4, 3, True, [1, 9, 30]),          # packed segments, one of a single token
    (4, 2, 200, True, [64, 300, 17]),     # longer than two blocks: the blocked path
    (6, 2, 32, True, [256]),              # window 32 over 256 tokens: the banded path
    (4, 2, 7, True, [1, 50, 205, 3]),     # banded, packed, the last block padded
    (4, 1, 7, False, [300]),              # banded without sinks
])
def test_training_attention_equals_the_reference(heads, kv_heads, window, sinks, lengths):
    torch.manual_seed(0)
    q, k, v, pos, seg = packed_row(lengths, heads, kv_heads)
    s = (torch.randn(heads) * 2).requires_grad_() if sinks else None
    kw = dict(scale=0.3, q_pos=pos, k_pos=pos, sinks=s, window=window, q_seg=seg, k_seg=seg)
    out, lse = attention(q, k, v, lse=False, **kw)  # what MiMoAttention calls
    ref, _ = attention_reference(q, k, v, **kw)
    assert lse is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    params = [t for t in (q, k, v, s) if t is not None]
    weights = torch.randn_like(ref)
    for g, r in zip(_grads(out, weights, params), _grads(ref, weights, params)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_a_window_one_wider_is_seen():
    """The control: the comparison above is sensitive to the masking rule (a window of 8
    instead of 7 moves the outputs far beyond its tolerance)."""
    torch.manual_seed(0)
    q, k, v, pos, seg = packed_row([40], 6, 2)
    kw = dict(scale=0.3, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg)
    assert (attention_self(q, k, v, window=8, **kw)[0] - attention_reference(q, k, v, window=7, **kw)[0]).abs().max() > 1e-2


def test_the_dispatcher_sends_only_self_attention_without_lse_there(monkeypatch):
    calls = []
    module = importlib.import_module("mimo_train.kernels.attention")  # the package exports a function of that name
    monkeypatch.setattr(module, "attention_self",
                        lambda *a, **kw: calls.append(1) or attention_self(*a, **kw))
    torch.manual_seed(0)
    q, k, v, pos, seg = packed_row([20], 4, 2)
    kw = dict(scale=0.3, sinks=None, window=None, q_seg=seg, k_seg=seg)
    attention(q, k, v, q_pos=pos, k_pos=pos, lse=False, **kw)
    assert calls == [1]
    _, lse = attention(q, k, v, q_pos=pos, k_pos=pos, **kw)  # a caller that wants the lse gets it
    assert lse is not None and calls == [1]
    _, lse = attention(q, k, v, q_pos=pos, k_pos=pos.clone(), lse=False, **kw)  # not provably self-attention
    assert lse is not None and calls == [1]


def test_a_long_sliding_window_row_goes_banded(monkeypatch):
    module = importlib.import_module("mimo_train.kernels.attention")
    calls = []
    monkeypatch.setattr(module, "attention_banded", lambda *a, **kw: calls.append(1) or attention_banded(*a, **kw))
    torch.manual_seed(0)
    q, k, v, pos, seg = packed_row([256], 4, 2)
    kw = dict(scale=0.3, q_pos=pos, k_pos=pos, sinks=None, q_seg=seg, k_seg=seg, lse=False)
    attention(q, k, v, window=32, **kw)
    assert calls == [1]
    attention(q, k, v, window=100, **kw)  # 2 x (block 100 + window 100) > 256: the plain path
    attention(q, k, v, window=None, **kw)
    assert calls == [1]

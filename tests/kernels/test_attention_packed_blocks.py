"""A long packed row is attended block by block on the reference path: the same outputs,
log-sum-exps and gradients as the whole-row reference, without its [T, T] scores."""

import pytest
import torch

from mimo_train.kernels.attention import attention, attention_reference


def _packed(lengths, heads=4, kv_heads=2, dk=12, dv=8):
    n = sum(lengths)
    seg = torch.cat([torch.full((L,), i) for i, L in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(L) for L in lengths])[None]
    q = torch.randn(1, n, heads, dk, requires_grad=True)
    k = torch.randn(1, n, kv_heads, dk, requires_grad=True)
    v = torch.randn(1, n, kv_heads, dv, requires_grad=True)
    return q, k, v, pos, seg


@pytest.mark.parametrize("window,sinks", [(None, False), (7, True), (200, True)])
def test_blocked_packed_attention_equals_the_whole_row(window, sinks):
    torch.manual_seed(0)
    lengths = [1, 64, 130, 3, 64, 257, 17, 64]  # segments across block edges, one longer than a block
    q, k, v, pos, seg = _packed(lengths)
    s = (torch.randn(4) * 2).requires_grad_() if sinks else None
    kw = dict(scale=0.3, q_pos=pos, k_pos=pos, sinks=s, window=window, q_seg=seg, k_seg=seg)
    out, lse = attention(q, k, v, backend="reference", **kw)
    ref_out, ref_lse = attention_reference(q, k, v, **kw)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-6)
    params = [t for t in (q, k, v, s) if t is not None]
    grads = torch.autograd.grad((out * torch.cos(ref_out.detach())).sum(), params)
    ref_grads = torch.autograd.grad((ref_out * torch.cos(ref_out.detach())).sum(), params)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)

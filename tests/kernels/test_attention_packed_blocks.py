"""A long packed row is attended block by block on the reference path: the same outputs,
log-sum-exps and gradients as the whole-row reference, without its [T, T] scores."""

import pytest
import torch

from tests.kernels.attention_utils import packed_row
from mimo_train.kernels.attention import attention, attention_reference


@pytest.mark.parametrize("window,sinks", [(None, False), (7, True), (200, True)])
def test_blocked_packed_attention_equals_the_whole_row(window, sinks):
    torch.manual_seed(0)
    lengths = [1, 64, 130, 3, 64, 257, 17, 64]  # segments across block edges, one longer than a block
    q, k, v, pos, seg = packed_row(lengths)
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

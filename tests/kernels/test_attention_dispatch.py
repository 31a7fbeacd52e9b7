"""The dispatcher with the Triton backend (asked by MIMO_ATTENTION_BACKEND or by argument) picks
the right kernel for the call and matches the reference: the differentiable training kernel,
the cache kernel for a short query without grad, the training forward for a long prefill;
and it takes the model's own call (non-contiguous views, expanded positions)."""

import pytest
import torch

from mimo_train.kernels.attention import attention, attention_reference
from tests.kernels.attention_utils import TOL, packed, rel_err, triton_device

DEVICE = triton_device(module_level=True)  # or skip this module: see test_triton_interpreted.py

from mimo_train.kernels import triton_attention, triton_decode  # noqa: E402


def inputs(seq=20, requires_grad=False):
    gen = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_(requires_grad)  # noqa: E731
    pos, seg = packed([seq - 7, 7] if seq > 7 else [seq], 1, DEVICE)
    q, k, v = rand(1, seq, 4, 24), rand(1, seq, 2, 24), rand(1, seq, 2, 16)
    sinks = torch.tensor([1.0, -1.0, 2.0, -2.0], device=DEVICE).requires_grad_(requires_grad)
    return (q, k, v), dict(scale=0.2, q_pos=pos, k_pos=pos, sinks=sinks, window=5, q_seg=seg, k_seg=seg)


CALLS: list[str] = []


def spy(monkeypatch, module, name):
    """Record calls of module.name in a list shared by all spies of one test."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        CALLS.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("case", ["training", "decode", "prefill"])
def test_triton_backend_routes_and_matches(monkeypatch, case):
    CALLS.clear()
    spy(monkeypatch, triton_attention, "flash_attention")
    spy(monkeypatch, triton_decode, "decode_attention")
    seq = 20 if case != "decode" else 4
    args, kwargs = inputs(seq=seq, requires_grad=case == "training")
    monkeypatch.setenv("MIMO_ATTENTION_BACKEND", "triton")  # the environment variable forces it too
    out, lse = attention(*args, **kwargs)
    expected = {"training": "flash_attention", "prefill": "flash_attention", "decode": "decode_attention"}[case]
    assert CALLS == [expected]
    ref_out, ref_lse = attention_reference(*args, **kwargs)
    assert rel_err(out, ref_out) <= TOL[torch.float32] and rel_err(lse, ref_lse) <= TOL[torch.float32]
    if case == "training":
        assert type(out.grad_fn).__name__ == "FlashAttentionBackward"
        wrt = [*args, kwargs["sinks"]]
        grads = torch.autograd.grad(out.sum(), wrt)
        ref_grads = torch.autograd.grad(ref_out.sum(), wrt)
        assert all(rel_err(g, r) <= TOL[torch.float32] for g, r in zip(grads, ref_grads))


def test_model_call_shape():
    """The call MiMoAttention makes: [b, s, H, d] views of [s, b, H*d] projections (not
    contiguous), positions expanded over the batch, no segments."""
    s, b, heads, kv, dk, dv = 19, 2, 4, 2, 24, 16
    gen = torch.Generator().manual_seed(5)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_()  # noqa: E731
    q_flat, k_flat, v_flat = rand(s, b, heads * dk), rand(s, b, kv * dk), rand(s, b, kv * dv)
    q = q_flat.view(s, b, heads, dk).transpose(0, 1)
    k = k_flat.view(s, b, kv, dk).transpose(0, 1)
    v = v_flat.view(s, b, kv, dv).transpose(0, 1) * 0.707
    pos = torch.arange(s, device=DEVICE).expand(b, s)
    kwargs = dict(scale=dk ** -0.5, q_pos=pos, k_pos=pos, sinks=None, window=6, q_seg=None, k_seg=None)
    out, _ = attention(q, k, v, backend="triton", **kwargs)
    ref_out, _ = attention_reference(q, k, v, **kwargs)
    assert rel_err(out, ref_out) <= TOL[torch.float32]
    grads = torch.autograd.grad(out.square().sum(), [q_flat, k_flat, v_flat], retain_graph=True)
    ref_grads = torch.autograd.grad(ref_out.square().sum(), [q_flat, k_flat, v_flat])
    assert all(rel_err(g, r) <= TOL[torch.float32] for g, r in zip(grads, ref_grads))


def test_wide_query_groups_go_to_the_training_forward(monkeypatch):
    """16 query tokens x 8 heads per kv head is more rows than one decode program holds."""
    CALLS.clear()
    spy(monkeypatch, triton_attention, "flash_attention")
    spy(monkeypatch, triton_decode, "decode_attention")
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 16, h, 16, generator=gen).to(DEVICE) for h in (8, 1, 1))
    pos = torch.arange(16, device=DEVICE)[None]
    kwargs = dict(scale=0.25, q_pos=pos, k_pos=pos, window=3)
    out, lse = attention(q, k, v, backend="triton", **kwargs)
    assert CALLS == ["flash_attention"]
    ref_out, ref_lse = attention_reference(q, k, v, **kwargs)
    assert rel_err(out, ref_out) <= TOL[torch.float32] and rel_err(lse, ref_lse) <= TOL[torch.float32]

"""The Triton training attention equals the reference: output, lse and the gradients of q, k,
v and the sinks (also through lse), over random shapes. On CPU it runs under the Triton
interpreter with 16-wide blocks, so the small shapes here still cross block edges, skip
blocks, straddle packing boundaries and leave ragged tails."""

import random

import pytest
import torch

from mimo_train.kernels.attention import attention_reference
from tests.kernels.attention_utils import TOL, packed, random_lengths, rel_err, sinks_both_signs, triton_device

DEVICE = triton_device(module_level=True)  # or skip this module: see test_triton_interpreted.py

from mimo_train.kernels.triton_attention import flash_attention  # noqa: E402


# feature flags per case; the shapes are drawn from the seed
CASES = {
    "packed_swa_sinks_gqa": dict(seed=0, segments=3, window=True, sinks=True, rep=2),
    "global_batch2": dict(seed=1, segments=1, window=False, sinks=False, rep=1, batch=2),
    "packed_global_sinks_gqa4": dict(seed=2, segments=2, window=False, sinks=True, rep=4),
    "swa_window_over_short_seqs": dict(seed=3, segments=3, window=True, sinks=True, rep=1, long_window=True),
}


def make_case(dtype, seed, segments, window, sinks, rep, batch=1, long_window=False):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lengths = random_lengths(rng, segments, 5, 40)
    kv_heads = rng.choice([1, 2])
    heads = kv_heads * rep
    dk, dv = rng.choice([(24, 16), (40, 8), (16, 24)])
    w = None
    if window:
        # below the sequence length, or (long_window) above some of the packed sequences
        w = rng.randint(30, 45) if long_window else rng.randint(1, 12)
    pos, seg = packed(lengths, batch, DEVICE)
    s = pos.shape[1]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype).requires_grad_()

    q, k, v = rand(batch, s, heads, dk), rand(batch, s, kv_heads, dk), rand(batch, s, kv_heads, dv)
    kwargs = dict(scale=dk ** -0.5, q_pos=pos, k_pos=pos, window=w)
    if segments > 1:
        kwargs.update(q_seg=seg, k_seg=seg)
    if sinks:
        kwargs["sinks"] = sinks_both_signs(heads, gen, DEVICE).to(dtype).requires_grad_()
    return (q, k, v), kwargs, gen


def check(inputs, kwargs, gen, dtype):
    out, lse = flash_attention(*inputs, **kwargs)
    ref_out, ref_lse = attention_reference(*inputs, **kwargs)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape and lse.shape == ref_lse.shape
    tol = TOL[dtype]
    assert rel_err(out, ref_out) <= tol
    assert rel_err(lse, ref_lse) <= tol

    grad_out = torch.randn(out.shape, generator=gen).to(out)
    grad_lse = torch.randn(lse.shape, generator=gen).to(lse)
    wrt = list(inputs) + ([kwargs["sinks"]] if kwargs.get("sinks") is not None else [])
    grads = torch.autograd.grad((out.float() * grad_out).sum() + (lse * grad_lse).sum(), wrt)
    ref_grads = torch.autograd.grad((ref_out.float() * grad_out).sum() + (ref_lse * grad_lse).sum(), wrt)
    for name, g, r in zip(["q", "k", "v", "sinks"], grads, ref_grads):
        assert g.dtype == r.dtype, name
        assert rel_err(g, r) <= tol, f"d{name}: {rel_err(g, r)}"


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_fp32(case):
    inputs, kwargs, gen = make_case(torch.float32, **CASES[case])
    check(inputs, kwargs, gen, torch.float32)


@pytest.mark.parametrize("case", ["packed_swa_sinks_gqa", "packed_global_sinks_gqa4"])
def test_forward_and_gradients_bf16(case):
    inputs, kwargs, gen = make_case(torch.bfloat16, **CASES[case])
    check(inputs, kwargs, gen, torch.bfloat16)


def test_queries_against_a_longer_cache():
    """Chunked prefill: 21 queries at positions 30..50 against 53 slots holding positions
    0..50 and two empty slots (-1), with a window and sinks; gradients included."""
    gen = torch.Generator().manual_seed(7)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_()  # noqa: E731
    q, k, v = rand(1, 21, 4, 24), rand(1, 53, 2, 24), rand(1, 53, 2, 16)
    k_pos = torch.cat([torch.arange(40), torch.tensor([-1, -1]), torch.arange(40, 51)])[None].to(DEVICE)
    q_pos = torch.arange(30, 51)[None].to(DEVICE)
    kwargs = dict(scale=0.2, q_pos=q_pos, k_pos=k_pos, window=9,
                  sinks=sinks_both_signs(4, gen, DEVICE).requires_grad_())
    check((q, k, v), kwargs, gen, torch.float32)


def test_rows_that_see_nothing():
    """Padding queries (position -1, no sinks) give out 0 and lse -inf, and no NaN gradient."""
    q = torch.randn(1, 20, 2, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 20, 1, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 20, 1, 16, device=DEVICE, requires_grad=True)
    pos = torch.cat([torch.arange(17), torch.full((3,), -1)])[None].to(DEVICE)
    out, lse = flash_attention(q, k, v, scale=0.25, q_pos=pos, k_pos=pos)
    assert torch.equal(out[0, 17:], torch.zeros_like(out[0, 17:]))
    assert torch.isinf(lse[0, :, 17:]).all() and (lse[0, :, 17:] < 0).all()
    ref_out, _ = attention_reference(q, k, v, scale=0.25, q_pos=pos, k_pos=pos)
    assert rel_err(out, ref_out) <= TOL[torch.float32]
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))

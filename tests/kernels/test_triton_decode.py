"""The Triton decode / verify kernel equals the reference on the caches the engine keeps: a
full cache with sequences of different lengths in one batch (empty tail slots), and a
ring buffer for window layers (slots in any order, absolute positions, a sequence shorter
than the ring). One query token (decode) or K+1 (verification), window, sinks of both
signs, GQA, dk != dv, split-KV merging."""

import random

import pytest
import torch

from mimo_train.kernels.attention import attention_reference
from tests.kernels.attention_utils import TOL, rel_err, sinks_both_signs, triton_device

DEVICE = triton_device(module_level=True)  # or skip this module: see test_triton_interpreted.py

from mimo_train.kernels.triton_decode import decode_attention  # noqa: E402


def cache_case(dtype, seed, *, lengths, sq, heads, kv_heads, window, sinks, slots, ring):
    """lengths[i] tokens of sequence i are cached, the last sq of them are the queries."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    dk, dv = random.Random(seed).choice([(24, 16), (40, 8)])
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)  # noqa: E731
    q, k, v = rand(b, sq, heads, dk), rand(b, slots, kv_heads, dk), rand(b, slots, kv_heads, dv)
    k_pos = torch.full((b, slots), -1)
    q_pos = torch.empty(b, sq, dtype=torch.long)
    for i, n in enumerate(lengths):
        q_pos[i] = torch.arange(n - sq, n)
        if ring:  # slot = position mod ring size, rotated so the slot order is not the position order
            p = torch.arange(max(0, n - slots), n)
            k_pos[i, (p + 3 * i) % slots] = p
        else:
            k_pos[i, :n] = torch.arange(n)
    kwargs = dict(scale=dk ** -0.5, q_pos=q_pos.to(DEVICE), k_pos=k_pos.to(DEVICE), window=window,
                  sinks=sinks_both_signs(heads, gen, DEVICE) if sinks else None)
    return (q, k, v), kwargs


CASES = {
    # global layer: full cache, one token per sequence, 3 sequences of different lengths
    "decode_full_cache": dict(lengths=[5, 37, 20], sq=1, heads=4, kv_heads=1, window=None, sinks=False,
                              slots=40, ring=False),
    # verification of K=3 drafts against a full cache, window + sinks, forced 3-way split
    "verify_full_cache_window": dict(lengths=[9, 40, 23], sq=4, heads=4, kv_heads=2, window=6, sinks=True,
                                     slots=45, ring=False, num_splits=3),
    # window layer: ring buffer of window + K + 1 slots; the second sequence does not fill it
    "verify_ring_buffer": dict(lengths=[50, 8, 29], sq=3, heads=4, kv_heads=2, window=7, sinks=True,
                               slots=10, ring=True),
}


def run(dtype, seed, case):
    case = dict(case)
    splits = case.pop("num_splits", None)
    inputs, kwargs = cache_case(dtype, seed, **case)
    out, lse = decode_attention(*inputs, num_splits=splits, **kwargs)
    ref_out, ref_lse = attention_reference(*inputs, **kwargs)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert rel_err(out, ref_out) <= TOL[dtype]
    assert rel_err(lse, ref_lse) <= TOL[dtype]


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_fp32(case):
    run(torch.float32, 0, CASES[case])


@pytest.mark.parametrize("case", ["verify_full_cache_window", "verify_ring_buffer"])
def test_matches_reference_bf16(case):
    run(torch.bfloat16, 1, CASES[case])


def test_sequence_with_nothing_visible():
    """A batch row with an empty cache and padded queries (position -1): out 0, lse -inf, or
    with sinks lse = the sink; the other rows are unaffected."""
    inputs, kwargs = cache_case(torch.float32, 2, lengths=[12, 12], sq=2, heads=2, kv_heads=1,
                                window=None, sinks=False, slots=16, ring=False)
    kwargs["q_pos"][1] = -1
    kwargs["k_pos"][1] = -1
    out, lse = decode_attention(*inputs, **kwargs)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and (lse[1] == float("-inf")).all()
    ref_out, ref_lse = attention_reference(*inputs, **kwargs)
    assert rel_err(out, ref_out) <= TOL[torch.float32] and rel_err(lse, ref_lse) <= TOL[torch.float32]
    kwargs["sinks"] = torch.tensor([1.5, -0.5], device=DEVICE)
    out, lse = decode_attention(*inputs, **kwargs)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.allclose(lse[1], kwargs["sinks"][:, None].expand(2, 2))

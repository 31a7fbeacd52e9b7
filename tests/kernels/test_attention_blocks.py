"""The block liveness table that lets the training kernel skip masked blocks: it never drops
a block that holds a visible pair (else the kernel would be wrong), and on packed training
data it is tight, so a window-128 layer costs a few blocks per query block, not the row."""

import random

import torch

from mimo_train.kernels.attention_blocks import live_blocks, span
from tests.kernels.attention_utils import packed


def visible(q_pos, k_pos, q_seg, k_seg, window):
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (kp <= qp) & (kp >= 0)
    if window is not None:
        mask &= qp - kp <= window
    if q_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    return mask


def exact_live(mask, bm, bn):
    b, sq, sk = mask.shape
    nq, nk = -(-sq // bm), -(-sk // bn)
    padded = torch.zeros(b, nq * bm, nk * bn, dtype=torch.bool)
    padded[:, :sq, :sk] = mask
    return padded.view(b, nq, bm, nk, bn).any(4).any(2)


def test_never_drops_a_visible_block_on_arbitrary_layouts():
    """Random positions in any order (a ring buffer), empty slots, random segments."""
    rng = random.Random(0)
    for _ in range(30):
        sq, sk = rng.randint(1, 70), rng.randint(1, 70)
        q_pos = torch.randint(-2, 60, (2, sq))
        k_pos = torch.randint(-2, 60, (2, sk))
        segs = rng.random() < 0.5
        q_seg = torch.randint(0, 3, (2, sq)) if segs else None
        k_seg = torch.randint(0, 3, (2, sk)) if segs else None
        window = rng.choice([None, 0, 5, 20])
        bm, bn = rng.choice([4, 16]), rng.choice([8, 16])
        live = live_blocks(q_pos, k_pos, q_seg, k_seg, window, bm, bn)
        exact = exact_live(visible(q_pos, k_pos, q_seg, k_seg, window), bm, bn)
        assert live.shape == exact.shape
        assert not (exact & ~live).any()


def test_tight_on_packed_sequences():
    """Packed training data: the loop spans equal the exact ones, in both directions, including
    query blocks that straddle a packing boundary."""
    for lengths, window in [([300, 77, 500, 150], 128), ([1000], 128), ([70, 90, 33], None)]:
        pos, seg = packed(lengths, 1, "cpu")
        live = live_blocks(pos, pos, seg, seg, window, 64, 64)
        exact = exact_live(visible(pos, pos, seg, seg, window), 64, 64)
        for dim in (1, 2):
            assert all(torch.equal(a, b) for a, b in zip(span(live, dim), span(exact, dim)))


def test_window_cost_is_linear():
    """8K tokens, window 128, 64-wide blocks: every query block loops over 3 key blocks (its
    own and the two holding the 128 earlier keys), not over the causal prefix."""
    pos = torch.arange(8192)[None]
    lo, hi = span(live_blocks(pos, pos, None, None, 128, 64, 64), 2)
    assert (hi - lo).max().item() == 3
    lo, hi = span(live_blocks(pos, pos, None, None, None, 64, 64), 2)  # global: the causal prefix
    assert torch.equal(hi - lo, torch.arange(1, 129, dtype=torch.int32)[None])

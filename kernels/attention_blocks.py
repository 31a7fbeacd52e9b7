"""Which (query block, key block) pairs of an attention call can see each other.

The Triton training kernel loops, for each query block, only over the span of key blocks this
table marks live (and for each key block over the live query blocks in the backward). It is
built on the device from per-block ranges of positions and segment ids: no host sync, and
O((n / block)^2) small integer work per call. Pure torch, so it is tested without Triton.
"""

from __future__ import annotations

import torch


def _blocked(x: torch.Tensor, block: int) -> torch.Tensor:
    """[b, n] -> [b, ceil(n / block), block], the tail padded with the last element so that
    block minima and maxima are those of the real entries."""
    n = x.shape[1]
    nb = -(-n // block)
    idx = torch.arange(nb * block, device=x.device).clamp_(max=n - 1)
    return x[:, idx].view(x.shape[0], nb, block)


def _block_ranges(pos, seg, block):
    """Per block: position range of all its entries, and, with segments, the segment range and
    the position ranges of the entries of its first and of its last segment."""
    p = _blocked(pos, block)
    overall = (p.amin(-1), p.amax(-1))
    if seg is None:
        return overall, None, None
    s = _blocked(seg, block)
    s_range = (s.amin(-1), s.amax(-1))
    big = torch.iinfo(p.dtype).max
    ends = []
    for seg_id in s_range:
        rows = s == seg_id[..., None]
        ends.append((p.masked_fill(~rows, big).amin(-1), p.masked_fill(~rows, -big).amax(-1)))
    return overall, s_range, ends


def _restrict(overall, s_range, ends, common, single):
    """Position range of the entries in segment `common` where the pair of blocks shares that
    one segment (and it is the block's first or last), else the whole block's range."""
    lo, hi = overall
    for seg_id, (end_lo, end_hi) in zip(s_range, ends):
        use = single & (common == seg_id)
        lo, hi = torch.where(use, end_lo, lo), torch.where(use, end_hi, hi)
    return lo, hi


def live_blocks(q_pos, k_pos, q_seg, k_seg, window, block_m: int, block_n: int) -> torch.Tensor:
    """[b, q blocks, key blocks] bool: False only where no query of the block can see any key
    of the block. Built from range summaries, so it may keep a dead pair alive (never the
    reverse); exactness of the result never depends on it, only the work skipped does."""
    q_all, q_srange, q_ends = _block_ranges(q_pos, q_seg, block_m)
    k_all, k_srange, k_ends = _block_ranges(k_pos, k_seg, block_n)
    as_q = lambda x: x[:, :, None]  # noqa: E731  q blocks along dim 1, key blocks along dim 2
    as_k = lambda x: x[:, None, :]  # noqa: E731
    q_lo, q_hi = map(as_q, q_all)
    k_lo, k_hi = map(as_k, k_all)
    live = torch.ones(q_lo.shape[0], q_lo.shape[1], k_lo.shape[2], dtype=torch.bool, device=q_pos.device)
    if q_seg is not None:
        qs_min, qs_max = map(as_q, q_srange)
        ks_min, ks_max = map(as_k, k_srange)
        common, common_hi = torch.maximum(qs_min, ks_min), torch.minimum(qs_max, ks_max)
        live = common <= common_hi
        # A block straddling a packing boundary holds positions of two sequences. Compare only
        # the entries of the sequence both blocks share, or the new sequence's small positions
        # would keep the whole old sequence alive (and its large ones the new one's future).
        single = common == common_hi
        q_lo, q_hi = _restrict((q_lo, q_hi), (qs_min, qs_max), [tuple(map(as_q, e)) for e in q_ends], common, single)
        k_lo, k_hi = _restrict((k_lo, k_hi), (ks_min, ks_max), [tuple(map(as_k, e)) for e in k_ends], common, single)
    live = live & (k_hi >= 0) & (k_lo <= q_hi)
    if window is not None:
        live = live & (q_lo - k_hi <= window)
    return live


def span(live: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last live index along dim (empty span: lo >= hi)."""
    n = live.shape[dim]
    shape = [1] * live.dim()
    shape[dim] = n
    idx = torch.arange(n, device=live.device, dtype=torch.int32).view(shape)
    lo = torch.where(live, idx, n).amin(dim)
    hi = torch.where(live, idx + 1, 0).amax(dim)
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()

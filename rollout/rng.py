"""Counter-based uniforms: each request draws from its own seed, whatever batch it shares.

A request's k-th engine step uses uniforms hash(seed, k, j), so its samples do not depend on
which slot it sits in, on what else is running, or on the speculative depth of other
requests' steps. The hash is Chris Wellons' `lowbias32` (good avalanche, 5 integer ops), run on
int64 tensors holding 32-bit values, so it works on any device without a generator object.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


def mix32(x):
    """lowbias32 of a 32-bit value: a Python int or an int64 tensor (products wrap, low bits kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def request_seed(seed: int, *stream: int) -> int:
    """A 32-bit key for one request from a user seed (any int) and stream ids (prompt, sample)."""
    key = mix32((seed & MASK32) ^ mix32((seed >> 32) & MASK32))
    for s in stream:
        key = mix32(key ^ mix32((s + 0x9E3779B9) & MASK32))
    return key


def uniforms(keys: torch.Tensor, counters: torch.Tensor, width: int) -> torch.Tensor:
    """[n, width] float32 uniforms in [0, 1) (24 bits) for request keys [n] at step counters [n]."""
    j = torch.arange(width, device=keys.device)
    h = mix32(keys[:, None] ^ mix32((counters[:, None] * width + j) & MASK32))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))

"""Attention with learnable sinks, sliding window, GQA and q/k dim != v dim.

One masking rule serves training (packed sequences), decode and verification against a KV
cache: query i may see key j iff they belong to the same segment, k_pos[j] <= q_pos[i], and,
with a window W, q_pos[i] - k_pos[j] <= W (the query sees itself and W previous tokens).
Keys with position < 0 are empty cache slots and never seen.

Sinks (one logit s_h per head) join the softmax denominator and carry no value:
p_ij = exp(a_ij - m) / (exp(s_h - m) + sum_j exp(a_ij - m)),  m = max(max_j a_ij, s_h).
"""

from __future__ import annotations

import torch


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    sinks: torch.Tensor | None = None,
    window: int | None = None,
    q_seg: torch.Tensor | None = None,
    k_seg: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch attention.

    q [b, sq, H, dk], k [b, sk, Hkv, dk], v [b, sk, Hkv, dv]; q_pos [b, sq], k_pos [b, sk]
    (int); optional segment ids of the same shapes. Returns out [b, sq, H, dv] in v's dtype
    and the log-sum-exp [b, H, sq] (fp32, sink included) that a backward kernel needs.
    """
    b, sq, num_heads, _ = q.shape
    rep = num_heads // k.shape[2]
    k = k.repeat_interleave(rep, dim=2) if rep > 1 else k
    v = v.repeat_interleave(rep, dim=2) if rep > 1 else v
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale

    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    allowed = (kp <= qp) & (kp >= 0)
    if window is not None:
        allowed &= (qp - kp) <= window
    if q_seg is not None:
        allowed &= q_seg[:, :, None] == k_seg[:, None, :]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))

    if sinks is not None:
        sink = sinks.float().view(1, num_heads, 1, 1).expand(b, num_heads, sq, 1)
        scores = torch.cat([scores, sink], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    if sinks is not None:
        probs = probs[..., :-1]
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.float())
    return out.to(v.dtype), lse


def attention(q, k, v, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher: the reference on every device until a fused kernel is registered here."""
    return attention_reference(q, k, v, **kwargs)

"""Attention with learnable sinks, sliding window, GQA and q/k dim != v dim.

One masking rule serves training (packed sequences), decode and verification against a KV
cache: query i may see key j iff they belong to the same segment, k_pos[j] <= q_pos[i], and,
with a window W, q_pos[i] - k_pos[j] <= W (the query sees itself and W previous tokens).
Keys with position < 0 are empty cache slots and never seen.

Sinks (one logit s_h per head) join the softmax denominator and carry no value:
p_ij = exp(a_ij - m) / (exp(s_h - m) + sum_j exp(a_ij - m)),  m = max(max_j a_ij, s_h).
A query that sees no key and has no sink (a padding row) gets out 0 and lse -inf.

`attention` is the one entry point for training and the rollout engine. It runs the Triton
kernels on CUDA tensors and the reference elsewhere (short queries without grad, i.e. the
engine's steps on CPU, through `attention_grouped`, and training's self-attention, which needs
no log-sum-exp, through `attention_self`: the same math in fewer ops);
`backend="triton"` (or the environment variable MIMO_ATTENTION_BACKEND=triton) forces the
kernels, which on CPU tensors needs TRITON_INTERPRET=1 set before they are first imported
(triton fixes that at decoration).
Among the kernels: a differentiable call goes to the training kernel (kernels/triton_attention.py);
a short query without grad (decode, verification of K drafts) to the cache kernel
(kernels/triton_decode.py); a long query without grad (prefill) to the training forward.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "reference", "triton")
# Queries up to this length go to the decode kernel (K+1 verification tokens with K <= 15), as
# long as one program can hold the query rows sharing a kv head (GQA group x tokens): 64 rows
# is the global layer's 16 heads x 4 tokens, the most that compiles without spills at dk 192.
DECODE_MAX_QUERY = 16
DECODE_MAX_ROWS = 64


def hidden_keys(q_pos, k_pos, *, window=None, q_seg=None, k_seg=None) -> torch.Tensor:
    """The masking rule as a [b, sq, sk] bool tensor, True where query i may NOT see key j.
    Layers that share positions (every layer of a kind in one engine step) compute it once."""
    dist = q_pos[:, :, None] - k_pos[:, None, :]
    hidden = (dist < 0) | (k_pos < 0)[:, None, :]
    if window is not None:
        hidden |= dist > window
    if q_seg is not None:
        hidden |= q_seg[:, :, None] != k_seg[:, None, :]
    return hidden


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

    hidden = hidden_keys(q_pos, k_pos, window=window, q_seg=q_seg, k_seg=k_seg)
    scores = scores.masked_fill(hidden[:, None], float("-inf"))

    if sinks is not None:
        sink = sinks.float().view(1, num_heads, 1, 1).expand(b, num_heads, sq, 1)
        scores = torch.cat([scores, sink], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    # Rows with no visible key and no sink: exp(-inf - 0) = 0 instead of NaN.
    probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    if sinks is not None:
        probs = probs[..., :-1]
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.float())
    return out.to(v.dtype), lse


def attention_grouped(q, k, v, *, scale: float, q_pos, k_pos, sinks=None, window=None, q_seg=None, k_seg=None,
                      hidden=None):
    """`attention_reference` for short queries against a cache, in fewer and cheaper ops: the
    engine's decode / verify path on CPU, where a small model's step is dominated by per-op
    cost. Same contract and masking rule (`hidden`, if given, is `hidden_keys` of these
    positions, computed once by the caller); equal results up to fp32 rounding.

    The query heads sharing a kv head are stacked as rows of one matmul against that head's
    keys (no repeat of the cache), and the sink joins as one more logit column."""
    b, sq, num_heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[3]
    rep = num_heads // kv_heads
    # [b, Hkv, rep * sq, dk]: query head h = g * rep + r reads kv head g.
    qg = (q.float() * scale).permute(0, 2, 1, 3).reshape(b, kv_heads, rep * sq, dk)
    scores = torch.matmul(qg, k.float().permute(0, 2, 3, 1)).view(b, kv_heads, rep, sq, -1)
    if hidden is None:
        hidden = hidden_keys(q_pos, k_pos, window=window, q_seg=q_seg, k_seg=k_seg)
    scores.masked_fill_(hidden[:, None, None], float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, kv_heads, rep, 1, 1).expand(b, kv_heads, rep, sq, 1)
        scores = torch.cat([scores, sink], dim=-1)
    # Softmax by hand, to get the lse on the way; a row that sees nothing (no key, no sink)
    # has max -inf: it is shifted by 0 instead, so its weights are 0, not NaN.
    top = scores.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)
    probs = (scores - top).exp_()
    total = probs.sum(-1, keepdim=True)
    lse = total.log() + top
    probs.div_(total.clamp_min_(1e-30))
    if sinks is not None:
        probs = probs[..., :-1]
    out = torch.matmul(probs.view(b, kv_heads, rep * sq, -1), v.float().transpose(1, 2))
    out = out.view(b, num_heads, sq, dv).transpose(1, 2)
    return out.to(v.dtype), lse.view(b, num_heads, sq)


# A packed row longer than this is attended block by block on the reference path (below).
PACKED_BLOCK = 128


def attention_reference_packed(q, k, v, *, block: int = PACKED_BLOCK, attend=None,
                               **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`attention_reference` (or `attend`, e.g. `attention_self`) for one packed row (b = 1,
    queries = keys, segment ids given), computed per block of `block` queries against the keys
    from the start of the first query's segment: the same result, without the [T, T] score
    matrix of the whole row (a micro-batch of m samples of S tokens costs O(m S (S + block))
    instead of O((m S)^2))."""
    attend = attend or attention_reference
    seg = kwargs["q_seg"][0]
    n = seg.shape[0]
    change = torch.ones(n, dtype=torch.bool, device=seg.device)
    change[1:] = seg[1:] != seg[:-1]
    first = torch.where(change, torch.arange(n, device=seg.device), 0).cummax(0).values.tolist()
    outs, lses = [], []
    for a in range(0, n, block):
        b, lo = min(a + block, n), first[a]
        part = {key: (val[:, a:b] if key in ("q_pos", "q_seg") else val[:, lo:b] if key in ("k_pos", "k_seg") else val)
                for key, val in kwargs.items()}
        out, lse = attend(q[:, a:b], k[:, lo:b], v[:, lo:b], **part)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 1), (None if lses[0] is None else torch.cat(lses, 2))


def attention_self(q, k, v, *, scale: float, q_pos, k_pos, sinks=None, window=None, q_seg=None, k_seg=None):
    """`attention_reference`'s output, without its log-sum-exp, for self-attention: the training
    path on CPU. Every query sees at least its own key (queries and keys are the same tokens),
    so no row is empty and a plain softmax (one exp, and autograd's cheap softmax backward)
    replaces the reference's log-sum-exp and exp. The query heads sharing a kv head are rows of
    one matmul (no repeat of k and v), as in `attention_grouped`. Equal to the reference to
    fp32 rounding (tests/kernels/test_attention_self.py). Returns (out, None)."""
    b, sq, num_heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[3]
    rep = num_heads // kv_heads
    qg = (q.float() * scale).permute(0, 2, 1, 3).reshape(b, kv_heads, rep * sq, dk)
    scores = torch.matmul(qg, k.float().permute(0, 2, 3, 1)).view(b, kv_heads, rep, sq, -1)
    # The mask as an additive bias (0 or -inf), built once without the head dims: its backward
    # is the identity, where masked_fill's would fill the gradient again per head.
    hidden = hidden_keys(q_pos, k_pos, window=window, q_seg=q_seg, k_seg=k_seg)
    bias = torch.zeros(hidden.shape, dtype=scores.dtype, device=scores.device).masked_fill_(hidden, float("-inf"))
    scores = scores + bias[:, None, None]
    if sinks is not None:
        sink = sinks.float().view(1, kv_heads, rep, 1, 1).expand(b, kv_heads, rep, sq, 1)
        scores = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    out = torch.matmul(probs.reshape(b, kv_heads, rep * sq, -1), v.float().transpose(1, 2))
    return out.view(b, num_heads, sq, dv).transpose(1, 2).to(v.dtype), None


def banded_block(window: int) -> int:
    """Query block of `attention_banded`: at least 64 rows (fewer makes the small matmuls
    per-call bound), and at least the window, so a block's keys are at most twice its rows."""
    return max(64, window)


def attention_banded(q, k, v, *, scale: float, q_pos, k_pos, sinks=None, window: int, q_seg=None, k_seg=None):
    """`attention_self` for a sliding-window layer without the keys no query can see: the
    queries go in blocks of B = banded_block(window) rows, each against only the B + window keys
    that end with its block (one gather of k and v, the blocks batched into one softmax), so a
    row of n tokens scores n (B + window) pairs instead of n^2. The masking rule is applied to
    the gathered positions and segments as they are; the keys before the row's start are
    padding with position -1 (never seen) and the rows padding the last block form a segment of
    their own that sees only itself (so no row is empty). Returns (out, None)."""
    b, n, num_heads, dk = q.shape
    block = banded_block(window)
    blocks = -(-n // block)
    tail = blocks * block - n
    span = block + window

    def pad(x, front, back, value=0):
        parts = [x.new_full((x.shape[0], front, *x.shape[2:]), value)] if front else []
        parts.append(x)
        if back:
            parts.append(x.new_full((x.shape[0], back, *x.shape[2:]), value))
        return torch.cat(parts, dim=1) if len(parts) > 1 else x

    # Rows padding the last block: position 0 in a segment -2 of their own; keys before the start: -1.
    seg = q_seg if q_seg is not None else torch.zeros_like(q_pos)
    q_pos_p, seg_p = pad(q_pos, 0, tail, 0), pad(seg, 0, tail, -2)
    k_pos_p, k_seg_p = pad(q_pos_p, window, 0, -1), pad(seg_p, window, 0, -1)
    index = (torch.arange(blocks, device=q.device) * block)[:, None] + torch.arange(span, device=q.device)
    flat = index.reshape(-1)

    def keys(x):  # [b, window + n + tail, ...] -> [b * blocks, span, ...]
        return x[:, flat].reshape(b * blocks, span, *x.shape[2:])

    out, _ = attention_self(
        pad(q, 0, tail).reshape(b * blocks, block, num_heads, dk),
        keys(pad(k, window, tail)), keys(pad(v, window, tail)), scale=scale,
        q_pos=q_pos_p.reshape(b * blocks, block), k_pos=keys(k_pos_p), sinks=sinks, window=window,
        q_seg=seg_p.reshape(b * blocks, block), k_seg=keys(k_seg_p))
    return out.reshape(b, blocks * block, num_heads, -1)[:, :n], None


def attention(
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
    backend: str | None = None,
    hidden: torch.Tensor | None = None,
    lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatcher with the contract of `attention_reference` (same arguments, same outputs).

    backend: "auto" (default: Triton on CUDA; elsewhere `attention_grouped` for short queries
    without grad -- the engine's decode and verify steps -- and the reference for the rest),
    "reference" or "triton"; None reads MIMO_ATTENTION_BACKEND, then falls back to "auto".
    hidden: optional `hidden_keys(q_pos, k_pos, ...)` precomputed by a caller that reuses it
    across layers; only `attention_grouped` reads it (the other paths mask from positions).
    lse=False: the caller does not use the log-sum-exp (training). On the reference path,
    self-attention (`k_pos is q_pos`, `k_seg is q_seg`) then goes to `attention_self`, or, on a
    row at least twice (block + window) long with a window, to `attention_banded`; both return
    None for it; other paths return it anyway.
    """
    kwargs = dict(scale=scale, q_pos=q_pos, k_pos=k_pos, sinks=sinks, window=window, q_seg=q_seg, k_seg=k_seg)
    backend = backend or os.environ.get("MIMO_ATTENTION_BACKEND") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, sinks))
    if backend == "auto":
        if not q.is_cuda and not needs_grad and 0 < q.shape[1] <= DECODE_MAX_QUERY and k.shape[1] > 0:
            return attention_grouped(q, k, v, hidden=hidden, **kwargs)
        backend = "triton" if q.is_cuda else "reference"
    if backend == "reference":
        attend = attention_self if not lse and k_pos is q_pos and k_seg is q_seg else attention_reference
        if attend is attention_self and window is not None and q.shape[1] >= 2 * (banded_block(window) + window):
            return attention_banded(q, k, v, **kwargs)
        packed = q_seg is not None and q.shape[0] == 1 and q.shape[1] == k.shape[1] > 2 * PACKED_BLOCK
        if packed and torch.equal(q_pos, k_pos) and torch.equal(q_seg, k_seg):
            return attention_reference_packed(q, k, v, attend=attend, **kwargs)
        return attend(q, k, v, **kwargs)

    from mimo_train.kernels import triton_attention, triton_decode

    if not q.is_cuda and not is_interpreted():
        raise RuntimeError("the Triton attention kernels got CPU tensors but were compiled for a GPU; "
                           "set TRITON_INTERPRET=1 before mimo_train.kernels.triton_attention is imported")
    if q.shape[1] == 0 or k.shape[1] == 0:  # nothing for a kernel to do; the reference handles it
        return attention_reference(q, k, v, **kwargs)
    rows = q.shape[1] * (q.shape[2] // k.shape[2])
    if not needs_grad and q.shape[1] <= DECODE_MAX_QUERY and rows <= DECODE_MAX_ROWS:
        return triton_decode.decode_attention(q, k, v, **kwargs)
    return triton_attention.flash_attention(q, k, v, **kwargs)


def is_interpreted() -> bool:
    """Whether the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 at import)."""
    from mimo_train.kernels import triton_attention, triton_decode

    return all(type(kernel).__name__ == "InterpretedFunction"
               for kernel in (triton_attention._fwd_kernel, triton_decode._split_kernel))

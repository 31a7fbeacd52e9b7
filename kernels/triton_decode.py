"""Triton decode / verify attention: 1..K+1 query tokens per sequence against a KV cache.

The cache is [b, slots, Hkv, d] with one absolute position per slot (k_pos [b, slots]); empty
slots have k_pos < 0. That covers a full cache (slot = position, tail empty, sequences of
different lengths in one batch) and a ring buffer for sliding-window layers (slot =
position mod size, any order). The masking rule, sinks and return contract are those of
`attention_reference` in kernels/attention.py; no autograd (the engine runs under no_grad).

Decoding is bound by reading the cache, so the kernel reads each key/value block once per kv
head: one program holds all rep * sq query rows that share that kv head (GQA heads x draft
tokens). Long caches are split across programs (flash-decoding) and a second kernel merges
the partial softmax states and adds the sink. Blocks whose keys no query can see (empty
slots, outside the window, in the future) are skipped after reading only their positions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mimo_train.kernels.triton_attention import LOG2E, _dot, _LN2, _LOG2E, _precision, _visible


@triton.jit
def _split_kernel(
    Q, K, V, QPOS, KPOS, QSEG, KSEG, M_PART, L_PART, ACC_PART,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh,
    seq_q, seq_k, n_kv_heads, rep, n_splits, blocks_per_split, qk_scale, window,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    # Row r is query token r % seq_q of head hk * rep + r // seq_q.
    r = tl.arange(0, BLOCK_M)
    row_ok = r < rep * seq_q
    t = r % seq_q
    h = hk * rep + r // seq_q
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = tl.load(Q + b.to(tl.int64) * sqb + t[:, None].to(tl.int64) * sqs + h[:, None] * sqh + offs_dk[None, :],
                mask=row_ok[:, None] & (offs_dk[None, :] < DK), other=0.0)
    qp = tl.load(QPOS + b * seq_q + t, mask=row_ok, other=-1)
    qs = qp
    if HAS_SEG:
        qs = tl.load(QSEG + b * seq_q + t, mask=row_ok, other=-1)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh

    m_i = tl.zeros([BLOCK_M], tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(seq_k, BLOCK_N))
    for kb in range(first, last):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seq_k
        kp = tl.load(KPOS + b * seq_k + offs_n, mask=col_ok, other=-1)
        ks = kp
        if HAS_SEG:
            ks = tl.load(KSEG + b * seq_k + offs_n, mask=col_ok, other=-2)
        vis = _visible(qp[:, None], qs[:, None], kp[None, :], ks[None, :], window, HAS_WINDOW, HAS_SEG)
        if tl.max(vis.to(tl.int32)) > 0:
            cols = offs_n.to(tl.int64)
            k = tl.load(k_base + cols[:, None] * sks + offs_dk[None, :],
                        mask=col_ok[:, None] & (offs_dk[None, :] < DK), other=0.0)
            s = _dot(q, tl.trans(k), PRECISION) * qk_scale
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * svs + offs_dv[None, :],
                        mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
            m_i = m_new

    part = (bhk * n_splits + split).to(tl.int64) * BLOCK_M + r
    tl.store(M_PART + part, m_i)
    tl.store(L_PART + part, l_i)
    tl.store(ACC_PART + part[:, None] * BLOCK_DV + offs_dv[None, :], acc)


@triton.jit
def _merge_kernel(
    M_PART, L_PART, ACC_PART, SINKS, O, LSE, sob, sos, soh,
    seq_q, n_kv_heads, rep, n_splits,
    DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_SINK: tl.constexpr,
):
    bhk = tl.program_id(0)
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    r = tl.arange(0, BLOCK_M)
    row_ok = r < rep * seq_q
    t = r % seq_q
    h = hk * rep + r // seq_q
    offs_dv = tl.arange(0, BLOCK_DV)
    base = bhk.to(tl.int64) * n_splits * BLOCK_M

    m = tl.zeros([BLOCK_M], tl.float32) - float("inf")
    for split in range(n_splits):
        m = tl.maximum(m, tl.load(M_PART + base + split * BLOCK_M + r))
    if HAS_SINK:
        sink = tl.load(SINKS + h, mask=row_ok, other=0.0).to(tl.float32) * _LOG2E
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for split in range(n_splits):
        part = base + split * BLOCK_M + r
        w = tl.exp2(tl.load(M_PART + part) - m_safe)
        l += w * tl.load(L_PART + part)
        acc += w[:, None] * tl.load(ACC_PART + part[:, None] * BLOCK_DV + offs_dv[None, :])
    if HAS_SINK:
        l += tl.exp2(sink - m_safe)  # the sink adds mass to the denominator, nothing to acc

    l_safe = tl.where(l == 0.0, 1.0, l)
    out = acc / l_safe[:, None]
    lse = tl.where(l == 0.0, float("-inf"), (m + tl.log2(l_safe)) * _LN2)
    tl.store(O + b.to(tl.int64) * sob + t[:, None].to(tl.int64) * sos + h[:, None] * soh + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + (b * (n_kv_heads * rep) + h).to(tl.int64) * seq_q + t, lse, mask=row_ok)


def config(device_type: str, dtype: torch.dtype, rows: int, dk: int, dv: int) -> tuple[dict, dict]:
    """Block sizes and launch options of the split kernel for `rows` = rep * sq query rows."""
    consts = dict(BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_DK=max(16, triton.next_power_of_2(dk)),
                  BLOCK_DV=max(16, triton.next_power_of_2(dv)))
    if device_type != "cuda":
        return dict(consts, BLOCK_N=16), {}
    if dtype == torch.float32:  # exact FMAs, tests only
        return dict(consts, BLOCK_N=16), dict(num_warps=8, num_stages=1)
    # From ptxas reports for sm_90 at dk 192 / dv 128: no spills with 8 warps for 16 rows x 64
    # keys and up to 64 rows x 32 keys (the global layer's 16 heads x 4 verify tokens).
    return dict(consts, BLOCK_N=64 if consts["BLOCK_M"] <= 16 else 32), dict(num_warps=8, num_stages=2)


def _num_splits(q: torch.Tensor, programs: int, blocks: int) -> int:
    """Enough programs to fill the GPU twice over; never more splits than key blocks."""
    if q.device.type != "cuda":
        return min(blocks, 2)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(blocks, triton.cdiv(2 * sms, programs)))


@torch.no_grad()
def decode_attention(q, k, v, *, scale, q_pos, k_pos, sinks=None, window=None, q_seg=None, k_seg=None,
                     num_splits: int | None = None):
    """q [b, sq, H, dk] (sq small: 1 for decode, K+1 for verification) against the cache
    k [b, slots, Hkv, dk], v [b, slots, Hkv, dv]. Returns (out [b, sq, H, dv], lse [b, H, sq]).
    num_splits: how many programs share one sequence's cache (default: enough to fill the GPU)."""
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    b, sq, n_heads, dk = q.shape
    sk, n_kv, dv = k.shape[1], k.shape[2], v.shape[3]
    rep = n_heads // n_kv
    consts, launch = config(q.device.type, q.dtype, rep * sq, dk, dv)
    block_m, block_n, block_dv = consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_DV"]
    blocks = max(1, triton.cdiv(sk, block_n))
    n_splits = num_splits or _num_splits(q, b * n_kv, blocks)
    n_splits = min(n_splits, blocks)
    per_split = triton.cdiv(blocks, n_splits)
    n_splits = triton.cdiv(blocks, per_split)

    q_pos, k_pos = q_pos.contiguous(), k_pos.contiguous()
    has_seg = q_seg is not None
    q_seg = q_seg.contiguous() if has_seg else q_pos
    k_seg = k_seg.contiguous() if has_seg else k_pos
    f32 = dict(device=q.device, dtype=torch.float32)
    m_part = torch.empty(b * n_kv, n_splits, block_m, **f32)
    l_part = torch.empty(b * n_kv, n_splits, block_m, **f32)
    acc_part = torch.empty(b * n_kv, n_splits, block_m, block_dv, **f32)
    _split_kernel[(n_splits, b * n_kv)](
        q, k, v, q_pos, k_pos, q_seg, k_seg, m_part, l_part, acc_part,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        sq, sk, n_kv, rep, n_splits, per_split, float(scale) * LOG2E, window or 0,
        DK=dk, DV=dv, **consts, HAS_WINDOW=window is not None, HAS_SEG=has_seg, PRECISION=_precision(q), **launch)

    out = torch.empty(b, sq, n_heads, dv, device=q.device, dtype=v.dtype)
    lse = torch.empty(b, n_heads, sq, **f32)
    _merge_kernel[(b * n_kv,)](
        m_part, l_part, acc_part, sinks if sinks is not None else m_part, out, lse, *out.stride()[:3],
        sq, n_kv, rep, n_splits, DV=dv, BLOCK_M=block_m, BLOCK_DV=block_dv, HAS_SINK=sinks is not None)
    return out, lse

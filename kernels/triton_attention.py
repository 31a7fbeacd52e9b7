"""Triton flash attention for training: forward and backward, with sinks, window, GQA, dk != dv.

Same masking rule and return contract as `attention_reference` (see kernels/attention.py):
out [b, sq, H, dv] in v's dtype and the log-sum-exp [b, H, sq] (fp32, natural log, sink
included). Packed sequences are segment ids, positions are arbitrary integers.

Block skipping: before launching, a [b, q blocks, key blocks] liveness table is built from
per-block position and segment ranges (no host sync), and each program loops only over the
span of live blocks of its row (forward, dq) or column (dk/dv). With a 128 window or short
packed sequences that span is a few blocks, so cost grows linearly with the sequence.

The softmax runs in base 2 (exp2 is the native instruction): scores are pre-multiplied by
log2(e); the stored lse is converted back to natural log so it matches the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mimo_train.kernels.attention_blocks import live_blocks, span

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _visible(qp, qs, kp, ks, window, HAS_WINDOW: tl.constexpr, HAS_SEG: tl.constexpr):
    """The masking rule on broadcastable operands (q along one axis, k along the other)."""
    vis = (kp <= qp) & (kp >= 0)
    if HAS_WINDOW:
        vis = vis & (qp - kp <= window)
    if HAS_SEG:
        vis = vis & (qs == ks)
    return vis


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    if PRECISION == "upcast":
        # triton 3.9's interpreter multiplies bf16 operands as their raw uint16 bits; in fp32
        # the products are the same exact values a tensor core forms from bf16 inputs.
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, SINKS, QPOS, KPOS, QSEG, KSEG, KV_LO, KV_HI,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
    seq_q, seq_k, n_heads, rep, n_qblocks, qk_scale, window,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_SINK: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // rep
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seq_q
    rows = offs_m.to(tl.int64)

    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + rows[:, None] * sqs + offs_dk[None, :],
                mask=row_ok[:, None] & (offs_dk[None, :] < DK), other=0.0)
    qp = tl.load(QPOS + b * seq_q + offs_m, mask=row_ok, other=-1)
    qs = qp
    if HAS_SEG:
        qs = tl.load(QSEG + b * seq_q + offs_m, mask=row_ok, other=-1)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh

    if HAS_SINK:
        # The sink is a key with logit s_h and no value: start the running max there.
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(SINKS + h).to(tl.float32) * _LOG2E
        l_i = tl.zeros([BLOCK_M], tl.float32) + 1.0
    else:
        m_i = tl.zeros([BLOCK_M], tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    lo = tl.load(KV_LO + b * n_qblocks + pid_m)
    hi = tl.load(KV_HI + b * n_qblocks + pid_m)
    for kb in range(lo, hi):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seq_k
        cols = offs_n.to(tl.int64)
        k = tl.load(k_base + cols[:, None] * sks + offs_dk[None, :],
                    mask=col_ok[:, None] & (offs_dk[None, :] < DK), other=0.0)
        kp = tl.load(KPOS + b * seq_k + offs_n, mask=col_ok, other=-1)
        ks = kp
        if HAS_SEG:
            ks = tl.load(KSEG + b * seq_k + offs_n, mask=col_ok, other=-2)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        vis = _visible(qp[:, None], qs[:, None], kp[None, :], ks[None, :], window, HAS_WINDOW, HAS_SEG)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen nothing yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svs + offs_dv[None, :],
                    mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new

    # A row that sees no key and has no sink gets out 0 and lse -inf (the reference agrees).
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2)
    tl.store(O + b.to(tl.int64) * sob + h * soh + rows[:, None] * sos + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + bh.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, QPOS, KPOS, QSEG, KSEG, KV_LO, KV_HI,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh,
    seq_q, seq_k, n_heads, rep, n_qblocks, scale, qk_scale, window,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // rep
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seq_q
    rows = offs_m.to(tl.int64)
    dk_ok = offs_dk[None, :] < DK

    q_off = b.to(tl.int64) * sqb + h * sqh + rows[:, None] * sqs + offs_dk[None, :]
    q = tl.load(Q + q_off, mask=row_ok[:, None] & dk_ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdob + h * sdoh + rows[:, None] * sdos + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse2 = tl.load(LSE + bh.to(tl.int64) * seq_q + offs_m, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(DELTA + bh.to(tl.int64) * seq_q + offs_m, mask=row_ok, other=0.0)
    qp = tl.load(QPOS + b * seq_q + offs_m, mask=row_ok, other=-1)
    qs = qp
    if HAS_SEG:
        qs = tl.load(QSEG + b * seq_q + offs_m, mask=row_ok, other=-1)
    k_base = K + b.to(tl.int64) * skb + hk * skh
    v_base = V + b.to(tl.int64) * svb + hk * svh

    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    lo = tl.load(KV_LO + b * n_qblocks + pid_m)
    hi = tl.load(KV_HI + b * n_qblocks + pid_m)
    for kb in range(lo, hi):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seq_k
        cols = offs_n.to(tl.int64)
        k = tl.load(k_base + cols[:, None] * sks + offs_dk[None, :], mask=col_ok[:, None] & dk_ok, other=0.0)
        v = tl.load(v_base + cols[:, None] * svs + offs_dv[None, :],
                    mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        kp = tl.load(KPOS + b * seq_k + offs_n, mask=col_ok, other=-1)
        ks = kp
        if HAS_SEG:
            ks = tl.load(KSEG + b * seq_k + offs_n, mask=col_ok, other=-2)
        vis = _visible(qp[:, None], qs[:, None], kp[None, :], ks[None, :], window, HAS_WINDOW, HAS_SEG)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & dk_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK_, DV_, LSE, DELTA, QPOS, KPOS, QSEG, KSEG, Q_LO, Q_HI,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh,
    seq_q, seq_k, n_kv_heads, rep, n_kblocks, scale, qk_scale, window,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per key block and kv head; it owns dk/dv of those keys and sums over the
    `rep` query heads that share them (GQA), so no atomics and a deterministic result."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < seq_k
    cols = offs_n.to(tl.int64)
    dk_ok = offs_dk[None, :] < DK
    dv_ok = offs_dv[None, :] < DV

    k_off = b.to(tl.int64) * skb + hk * skh + cols[:, None] * sks + offs_dk[None, :]
    v_off = b.to(tl.int64) * svb + hk * svh + cols[:, None] * svs + offs_dv[None, :]
    k = tl.load(K + k_off, mask=col_ok[:, None] & dk_ok, other=0.0)
    v = tl.load(V + v_off, mask=col_ok[:, None] & dv_ok, other=0.0)
    kp = tl.load(KPOS + b * seq_k + offs_n, mask=col_ok, other=-1)
    ks = kp
    if HAS_SEG:
        ks = tl.load(KSEG + b * seq_k + offs_n, mask=col_ok, other=-2)

    dk = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo = tl.load(Q_LO + b * n_kblocks + pid_n)
    hi = tl.load(Q_HI + b * n_kblocks + pid_n)
    for g in range(rep):
        h = hk * rep + g
        row_base = (b * (n_kv_heads * rep) + h).to(tl.int64) * seq_q
        for qb in range(lo, hi):
            offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = offs_m < seq_q
            rows = offs_m.to(tl.int64)
            q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + rows[:, None] * sqs + offs_dk[None, :],
                        mask=row_ok[:, None] & dk_ok, other=0.0)
            do = tl.load(DO + b.to(tl.int64) * sdob + h * sdoh + rows[:, None] * sdos + offs_dv[None, :],
                         mask=row_ok[:, None] & dv_ok, other=0.0)
            lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0) * _LOG2E
            delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
            qp = tl.load(QPOS + b * seq_q + offs_m, mask=row_ok, other=-1)
            qs = qp
            if HAS_SEG:
                qs = tl.load(QSEG + b * seq_q + offs_m, mask=row_ok, other=-1)
            vis = _visible(qp[None, :], qs[None, :], kp[:, None], ks[:, None], window, HAS_WINDOW, HAS_SEG)
            s_t = _dot(k, tl.trans(q), PRECISION) * qk_scale
            p_t = tl.where(vis, tl.exp2(s_t - lse2[None, :]), 0.0)
            dv += _dot(p_t.to(do.dtype), do, PRECISION)
            dp_t = _dot(v, tl.trans(do), PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(ds_t.to(q.dtype), q, PRECISION)
    tl.store(DK_ + k_off, (dk * scale).to(DK_.dtype.element_ty), mask=col_ok[:, None] & dk_ok)
    tl.store(DV_ + v_off, dv.to(DV_.dtype.element_ty), mask=col_ok[:, None] & dv_ok)


def config(device_type: str, dtype: torch.dtype, dk: int, dv: int, backward: bool) -> tuple[dict, dict]:
    """Block sizes (kernel constants) and launch options for the training kernels."""
    dims = dict(BLOCK_DK=max(16, triton.next_power_of_2(dk)), BLOCK_DV=max(16, triton.next_power_of_2(dv)))
    if device_type != "cuda":  # the interpreter: small blocks so tests cross block edges
        return dict(BLOCK_M=16, BLOCK_N=16, **dims), {}
    if dtype == torch.float32:
        # fp32 runs as exact FMAs (tests only): small tiles compile fast and barely spill.
        return dict(BLOCK_M=16, BLOCK_N=16, **dims), dict(num_warps=4, num_stages=1)
    # Picked from ptxas reports for sm_90 at dk 192 (tile padded to 256) and dv 128: the largest
    # tiles without register spills (forward 202 registers, dq 255, dk/dv 40 bytes spilled).
    # Not yet timed on a GPU.
    if backward:
        return dict(BLOCK_M=32, BLOCK_N=32, **dims), dict(num_warps=8, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=32, **dims), dict(num_warps=8, num_stages=2)


def _precision(x: torch.Tensor) -> str:
    if x.device.type != "cuda":
        return "upcast"
    # fp32 inputs must not go through tf32 on tensor cores, or they miss the 1e-4 contract.
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _prep(q_pos, k_pos, q_seg, k_seg):
    pos = [t.contiguous() for t in (q_pos, k_pos)]
    seg = [t.contiguous() if t is not None else None for t in (q_seg, k_seg)]
    return pos[0], pos[1], seg[0], seg[1]


def _forward(q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, scale, window):
    b, sq, n_heads, dk = q.shape
    sk, n_kv, dv = k.shape[1], k.shape[2], v.shape[3]
    consts, launch = config(q.device.type, q.dtype, dk, dv, backward=False)
    live = live_blocks(q_pos, k_pos, q_seg, k_seg, window, consts["BLOCK_M"], consts["BLOCK_N"])
    kv_lo, kv_hi = span(live, 2)
    out = torch.empty(b, sq, n_heads, dv, device=q.device, dtype=v.dtype)
    lse = torch.empty(b, n_heads, sq, device=q.device, dtype=torch.float32)
    n_qblocks = live.shape[1]
    has_seg = q_seg is not None
    _fwd_kernel[(n_qblocks, b * n_heads)](
        q, k, v, out, lse, sinks if sinks is not None else q_pos, q_pos, k_pos,
        q_seg if has_seg else q_pos, k_seg if has_seg else k_pos, kv_lo, kv_hi,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        sq, sk, n_heads, n_heads // n_kv, n_qblocks, scale * LOG2E, window or 0,
        DK=dk, DV=dv, HAS_SINK=sinks is not None, HAS_WINDOW=window is not None, HAS_SEG=has_seg,
        PRECISION=_precision(q), **consts, **launch)
    return out, lse


def _backward(q, k, v, out, lse, do, dlse, sinks, q_pos, k_pos, q_seg, k_seg, scale, window):
    b, sq, n_heads, dk = q.shape
    sk, n_kv, dv = k.shape[1], k.shape[2], v.shape[3]
    consts, launch = config(q.device.type, q.dtype, dk, dv, backward=True)
    live = live_blocks(q_pos, k_pos, q_seg, k_seg, window, consts["BLOCK_M"], consts["BLOCK_N"])
    kv_lo, kv_hi = span(live, 2)
    q_lo, q_hi = span(live, 1)
    # d(score_ij) = p_ij (dO_i . v_j - delta_i); a gradient on lse adds p_ij dlse_i, which
    # is the same as lowering delta_i by dlse_i.
    delta = (do.float() * out.float()).sum(-1).transpose(1, 2)
    if dlse is not None:
        delta = delta - dlse
    delta = delta.contiguous()
    # Gradients share their input's strides, so one set of stride arguments indexes both.
    dq, dk_, dv_ = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in (q, k, v))
    has_seg = q_seg is not None
    segs = (q_seg if has_seg else q_pos, k_seg if has_seg else k_pos)
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    flags = dict(DK=dk, DV=dv, HAS_WINDOW=window is not None, HAS_SEG=has_seg,
                 PRECISION=_precision(q), **consts, **launch)
    _bwd_dq_kernel[(live.shape[1], b * n_heads)](
        q, k, v, do, dq, lse, delta, q_pos, k_pos, *segs, kv_lo, kv_hi, *common,
        sq, sk, n_heads, n_heads // n_kv, live.shape[1], scale, scale * LOG2E, window or 0, **flags)
    _bwd_dkdv_kernel[(live.shape[2], b * n_kv)](
        q, k, v, do, dk_, dv_, lse, delta, q_pos, k_pos, *segs, q_lo, q_hi, *common,
        sq, sk, n_kv, n_heads // n_kv, live.shape[2], scale, scale * LOG2E, window or 0, **flags)
    dsinks = None
    if sinks is not None:
        # The sink is a key with zero value: d s_h = sum_i p_sink_i (0 - delta_i).
        p_sink = torch.exp(sinks.float()[None, :, None] - lse)
        dsinks = -(p_sink * delta).sum((0, 2)).to(sinks.dtype)
    return dq, dk_, dv_, dsinks


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, scale, window):
        q_pos, k_pos, q_seg, k_seg = _prep(q_pos, k_pos, q_seg, k_seg)
        out, lse = _forward(q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, scale, window)
        ctx.save_for_backward(q, k, v, out, lse, sinks, q_pos, k_pos, q_seg, k_seg)
        ctx.scale, ctx.window = scale, window
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, sinks, q_pos, k_pos, q_seg, k_seg = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        grads = _backward(q, k, v, out, lse, dout, dlse, sinks, q_pos, k_pos, q_seg, k_seg,
                          ctx.scale, ctx.window)
        return (*grads, None, None, None, None, None, None)


def flash_attention(q, k, v, *, scale, q_pos, k_pos, sinks=None, window=None, q_seg=None, k_seg=None):
    """Training attention (differentiable in q, k, v, sinks and through lse)."""
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return FlashAttention.apply(q, k, v, sinks, q_pos, k_pos, q_seg, k_seg, float(scale), window)

"""Triton speculative verification + sampling: the contract of `speculative_verify` in
kernels/sampling.py (same arguments, same outputs, the same uniforms), fused into two kernels
and with no host synchronisation.

1. `_position_kernel`, one program per (row, verified position): one pass over the vocabulary
   for the max, the first argmax and the softmax normaliser of logits / T (online rescaling);
   then, for sampled rows with top-k / top-p, the filtering threshold (below); then the
   acceptance of the draft at that position: u_j * q_j(d) < p_j(d), with p_j(d) computed
   from the stats alone (one logit read). Per position it leaves the max, log-normaliser,
   kept mass, threshold, argmax and accept flag in small [B, K+1] buffers.
2. `_emit_kernel`, one program per row: n_accepted = drafts before the first rejection; the
   final token is drawn at position n_accepted from max(0, p - q) (q = 0 at the bonus
   position K) by inverse CDF with uniform K: a pass for the total mass (block-wise cumsum
   with a carry, so both passes see bit-identical CDF values), a pass counting CDF <= u *
   total; then tokens (-1 after the emitted ones) and log-probs (log_softmax(x / T), T = 1 for
   greedy rows). Greedy rows (T <= 0, or greedy=True for all) take argmaxes and read neither q
   nor u, which gives the reference's results for one-hot draft distributions.

Top-k / top-p without a sort. Filtering keeps every token whose scaled logit s is >= a
threshold, so only the threshold is needed. Each float32 s is mapped to an int32 key with the
same order (negative floats: low 31 bits flipped), and the threshold key is found by a
16-way search over the int32 key range: one pass over the vocabulary counts tokens and sums
exp(s - max) above 15 pivots at once, then the range shrinks to the sub-range that holds the
answer; at most 8 passes (4 bits each), usually fewer: the search stops as soon as the range
holds one token. Top-k: the largest key t with count(key >= t) >= k (the k-th largest value,
ties with it kept, as in the reference). Top-p, applied on the top-k set: the largest t with
mass(key >= t) / Z_k >= top_p, i.e. the reference's rule "keep a token while the mass before it
is < top_p" in terms of values. Both are exact set definitions, so the kept set is the
reference's, with these documented differences:
  - ties at the top-k threshold: the reference normalises the top-p probabilities over exactly
    k tokens, the kernel over every token tied with the k-th; -0.0 and +0.0 are distinct keys;
  - top_p >= 1 skips the filter, where the reference may drop tail tokens whose cumulative mass
    rounds up to 1.0 (probability ~1e-7);
  - sums run in a different order, so a probability, a cumulative mass or a CDF value can differ
    from the reference by float rounding: a decision flips only when a uniform (or top_p) falls
    within that rounding of a boundary. Tests use continuous random inputs (no ties), on which
    tokens and n_accepted are identical and log-probs agree to 1e-5.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INT32_MIN = tl.constexpr(-(2 ** 31))
N_PIVOTS = 16  # 4 bits of the threshold key per search pass


# The kernels write the scaling and the key mapping out instead of calling jit helpers, and
# reduce with tl.reduce / tl.associative_scan on triton's own combine functions rather than
# tl.sum / tl.max / tl.cumsum (jit functions themselves): under TRITON_INTERPRET=1 every jit
# call costs milliseconds, while these combine functions run as one numpy call.
_add = tl.standard._sum_combine
_max = tl.standard._elementwise_max
_min = tl.standard._elementwise_min


@triton.jit
def _threshold_search(row, n_vocab, temp, m, lo, hi, c_lo, s_lo, target, z_base,
                      BY_MASS: tl.constexpr, BLOCK_V: tl.constexpr, NP: tl.constexpr):
    """The largest key t in [lo, hi] with pred(t): count(key >= t) >= target, or with BY_MASS
    mass(key >= t) / z_base >= target (mass = sum of exp(s - m)). Requires pred(lo) and not
    pred(hi + 1); c_lo, s_lo are count and mass at lo. Returns a key that keeps the same set
    as t (lo once its range holds a single token), with the count and mass it keeps."""
    ip = tl.arange(0, NP)
    offs = tl.arange(0, BLOCK_V)
    c_hi = tl.full([], 0, tl.int32)  # tokens with key > hi
    while (lo < hi) & (c_lo - c_hi > 1):
        piv = lo + ((hi - lo + 1) * ip.to(tl.int64)) // NP  # piv[0] == lo, non-decreasing
        cnt = tl.full([NP], 0, tl.int32)
        mass = tl.full([NP], 0.0, tl.float32)
        for v0 in range(0, n_vocab, BLOCK_V):
            idx = v0 + offs
            ok = idx < n_vocab
            s = tl.math.div_rn(tl.load(row + idx, mask=ok, other=float("-inf")).to(tl.float32), temp)
            bits = s.to(tl.int32, bitcast=True)
            key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
            above = (key[:, None] >= piv[None, :]) & ok[:, None]
            cnt += tl.reduce(above.to(tl.int32), 0, _add)
            mass += tl.reduce(tl.where(above, tl.exp(s - m)[:, None], 0.0), 0, _add)
        if BY_MASS:
            pred = tl.math.div_rn(mass, z_base + tl.full([NP], 0.0, tl.float32)) >= target
        else:
            pred = cnt.to(tl.float32) >= target
        # pred is monotone along the pivots and true at piv[0] (up to rounding of the mass at
        # lo against z_base, for top_p within 1e-7 of 1): keep [piv[a], piv[a+1] - 1].
        a = tl.maximum(tl.reduce(pred.to(tl.int32), 0, _add) - 1, 0)
        top = a == NP - 1
        c_hi = tl.where(top, c_hi, tl.reduce(tl.where(ip == a + 1, cnt, 0), 0, _add))
        c_lo = tl.reduce(tl.where(ip == a, cnt, 0), 0, _add)
        s_lo = tl.reduce(tl.where(ip == a, mass, 0.0), 0, _add)
        size = hi - lo + 1
        hi = tl.where(top, hi, lo + (size * (a + 1)) // NP - 1)
        lo = lo + (size * a) // NP
    return lo, c_lo, s_lo


@triton.jit
def _position_kernel(
    LOGITS, TEMP, TOPK, TOPP, DRAFTS, Q, U,
    M, LOGZ, ZK, THR, AMAX, ACC,
    s_lb, s_lj, s_db, s_dj, s_qb, s_qj, s_ub, s_uj,
    n_vocab, n_drafts,
    HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, GREEDY: tl.constexpr,
    BLOCK_V: tl.constexpr, NP: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1)
    out = b * (n_drafts + 1) + j
    row = LOGITS + b.to(tl.int64) * s_lb + j.to(tl.int64) * s_lj
    t_raw = tl.load(TEMP + b).to(tl.float32)
    temp = tl.where(t_raw > 0, t_raw, 1.0)
    if GREEDY:
        sampled = t_raw != t_raw  # all rows greedy (False, as a tensor)
    else:
        sampled = t_raw > 0
    offs = tl.arange(0, BLOCK_V)

    # Max, first argmax, normaliser of exp(s - max) over the vocabulary.
    m = tl.full([], float("-inf"), tl.float32)
    z = tl.full([], 0.0, tl.float32)
    amax = tl.full([], 0, tl.int32)
    for v0 in range(0, n_vocab, BLOCK_V):
        idx = v0 + offs
        ok = idx < n_vocab
        s = tl.math.div_rn(tl.load(row + idx, mask=ok, other=float("-inf")).to(tl.float32), temp)
        bmax = tl.reduce(s, 0, _max)
        barg = tl.reduce(tl.where((s == bmax) & ok, idx, n_vocab), 0, _min)
        amax = tl.where(bmax > m, barg, amax)
        m_new = tl.maximum(m, bmax)
        alpha = tl.where(m_new == m, 1.0, tl.exp(m - m_new))
        z = z * alpha + tl.reduce(tl.where(s == float("-inf"), 0.0, tl.exp(s - m_new)), 0, _add)
        m = m_new

    # Filtering threshold (as a key) and the mass it keeps.
    thr = tl.full([], _INT32_MIN, tl.int64)
    kept = tl.full([], 0, tl.int32) + n_vocab
    z_kept = z
    m_bits = m.to(tl.int32, bitcast=True)
    hi = tl.where(m_bits < 0, m_bits ^ 0x7FFFFFFF, m_bits).to(tl.int64)  # the max's key
    if HAS_TOPK:
        k = tl.load(TOPK + b).to(tl.int32)
        if sampled & (k > 0) & (k < n_vocab):
            thr, kept, z_kept = _threshold_search(row, n_vocab, temp, m, thr, hi, kept, z_kept, k.to(tl.float32),
                                                  z_kept, False, BLOCK_V, NP)
    if HAS_TOPP:
        top_p = tl.load(TOPP + b).to(tl.float32)
        if sampled & (top_p < 1.0):
            thr, kept, z_kept = _threshold_search(row, n_vocab, temp, m, thr, hi, kept, z_kept, top_p, z_kept,
                                                  True, BLOCK_V, NP)
    tl.store(M + out, m)
    tl.store(LOGZ + out, tl.log(z))
    tl.store(ZK + out, z_kept)
    tl.store(THR + out, thr.to(tl.int32))
    tl.store(AMAX + out, amax)

    if j < n_drafts:
        d = tl.load(DRAFTS + b.to(tl.int64) * s_db + j * s_dj)
        if GREEDY:
            accept = d == amax
        else:
            if sampled:
                s_d = tl.math.div_rn(tl.load(row + d).to(tl.float32), temp)
                d_bits = s_d.to(tl.int32, bitcast=True)
                d_key = tl.where(d_bits < 0, d_bits ^ 0x7FFFFFFF, d_bits)
                p_d = tl.where(d_key >= thr, tl.math.div_rn(tl.exp(s_d - m), z_kept), 0.0)
                q_d = tl.load(Q + b.to(tl.int64) * s_qb + j.to(tl.int64) * s_qj + d).to(tl.float32)
                u = tl.load(U + b.to(tl.int64) * s_ub + j * s_uj).to(tl.float32)
                accept = u * q_d < p_d
            else:
                accept = d == amax
        tl.store(ACC + out, accept.to(tl.int32))


@triton.jit
def _emit_kernel(
    LOGITS, TEMP, DRAFTS, Q, U,
    M, LOGZ, ZK, THR, AMAX, ACC,
    N_ACC, TOKENS, LOGPROBS,
    s_lb, s_lj, s_db, s_dj, s_qb, s_qj, s_ub, s_uj,
    n_vocab, n_drafts,
    GREEDY: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    base = b * (n_drafts + 1)
    jj = tl.arange(0, BLOCK_K)
    flags = tl.load(ACC + base + jj, mask=jj < n_drafts, other=0)
    a = tl.reduce(tl.where((jj < n_drafts) & (flags == 0), jj, n_drafts), 0, _min)  # n_accepted
    t_raw = tl.load(TEMP + b).to(tl.float32)
    temp = tl.where(t_raw > 0, t_raw, 1.0)
    tok = tl.load(AMAX + base + a)

    if not GREEDY:
        if t_raw > 0:
            m_a = tl.load(M + base + a)
            z_a = tl.load(ZK + base + a)
            thr_a = tl.load(THR + base + a)
            row = LOGITS + b.to(tl.int64) * s_lb + a.to(tl.int64) * s_lj
            q_row = Q + b.to(tl.int64) * s_qb + a.to(tl.int64) * s_qj
            n_q = tl.where(a < n_drafts, n_vocab, 0)  # the bonus position K has q = 0
            offs = tl.arange(0, BLOCK_V)
            # Pass 1: total mass of the residual and its last token with mass. If q covers all
            # of p (p == q cannot reject; a guard only, as in the reference), again with q = 0:
            # the distribution is then p itself.
            again = n_q >= 0
            total = tl.full([], 0.0, tl.float32)
            last = tl.full([], -1, tl.int32)
            while again:
                total = tl.full([], 0.0, tl.float32)
                last = tl.full([], -1, tl.int32)
                for v0 in range(0, n_vocab, BLOCK_V):
                    idx = v0 + offs
                    ok = idx < n_vocab
                    s = tl.math.div_rn(tl.load(row + idx, mask=ok, other=float("-inf")).to(tl.float32), temp)
                    bits = s.to(tl.int32, bitcast=True)
                    kept = ok & (tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits) >= thr_a)
                    p = tl.where(kept, tl.math.div_rn(tl.exp(s - m_a), z_a), 0.0)
                    q = tl.load(q_row + idx, mask=idx < n_q, other=0.0).to(tl.float32)
                    r = tl.maximum(p - q, 0.0)
                    total = tl.reduce(total + tl.associative_scan(r, 0, _add), 0, _max)
                    last = tl.maximum(last, tl.reduce(tl.where(r > 0, idx, -1), 0, _max))
                again = (total <= 0.0) & (n_q > 0)
                n_q = tl.where(again, 0, n_q)
            x = tl.load(U + b.to(tl.int64) * s_ub + n_drafts * s_uj).to(tl.float32) * total
            # Pass 2: inverse CDF, count of CDF values <= u * total (the same cumsums as pass 1).
            carry = tl.full([], 0.0, tl.float32)
            below = tl.full([], 0, tl.int32)
            for v0 in range(0, n_vocab, BLOCK_V):
                idx = v0 + offs
                ok = idx < n_vocab
                s = tl.math.div_rn(tl.load(row + idx, mask=ok, other=float("-inf")).to(tl.float32), temp)
                bits = s.to(tl.int32, bitcast=True)
                kept = ok & (tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits) >= thr_a)
                p = tl.where(kept, tl.math.div_rn(tl.exp(s - m_a), z_a), 0.0)
                q = tl.load(q_row + idx, mask=idx < n_q, other=0.0).to(tl.float32)
                cdf = carry + tl.associative_scan(tl.maximum(p - q, 0.0), 0, _add)
                below += tl.reduce(((cdf <= x) & ok).to(tl.int32), 0, _add)
                carry = tl.reduce(cdf, 0, _max)
            tok = tl.minimum(below, last)

    emitted = jj <= a
    drafts = tl.load(DRAFTS + b.to(tl.int64) * s_db + jj * s_dj, mask=jj < a, other=0)
    tokens = tl.where(jj < a, drafts, tl.where(jj == a, tok.to(tl.int64), -1))
    x = tl.load(LOGITS + b.to(tl.int64) * s_lb + jj.to(tl.int64) * s_lj + tl.where(emitted, tokens, 0),
                mask=emitted, other=0.0).to(tl.float32)
    m = tl.load(M + base + jj, mask=emitted, other=0.0)
    logz = tl.load(LOGZ + base + jj, mask=emitted, other=0.0)
    logprobs = tl.where(emitted, (tl.math.div_rn(x, temp) - m) - logz, 0.0)
    in_row = jj <= n_drafts
    tl.store(TOKENS + base + jj, tokens, mask=in_row)
    tl.store(LOGPROBS + base + jj, logprobs, mask=in_row)
    tl.store(N_ACC + b, a.to(tl.int64))


def default_block_v(device: torch.device) -> int:
    """Vocabulary block: 1024 on a GPU; 32 under the interpreter, so small test vocabularies
    still span several blocks."""
    return 1024 if device.type == "cuda" else 32


def launch_options(device: torch.device) -> dict:
    """8 warps on a GPU: the search tile is 1024 tokens x 16 pivots (sm_90 ptxas: 115
    registers, no spills)."""
    return dict(num_warps=8) if device.type == "cuda" else {}


@torch.no_grad()
def speculative_verify_triton(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    uniforms: torch.Tensor | None,
    *,
    greedy: bool = False,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`speculative_verify` (see kernels/sampling.py) on two Triton kernels; block_v sets the
    vocabulary block (a power of two; default `default_block_v`)."""
    batch, k1, vocab = target_logits.shape
    k = k1 - 1
    dev = target_logits.device
    if not greedy and (uniforms is None or (k > 0 and draft_probs is None)):
        raise ValueError("sampled verification needs uniforms and, with drafts, draft_probs")
    n_acc = torch.empty(batch, dtype=torch.long, device=dev)
    tokens = torch.empty(batch, k1, dtype=torch.long, device=dev)
    logprobs = torch.empty(batch, k1, dtype=torch.float32, device=dev)
    if batch == 0:
        return n_acc, tokens, logprobs
    logits = target_logits if target_logits.stride(-1) == 1 else target_logits.contiguous()
    temperature = temperature.contiguous()
    f32 = dict(device=dev, dtype=torch.float32)
    i32 = dict(device=dev, dtype=torch.int32)
    m, logz, z_kept = (torch.empty(batch, k1, **f32) for _ in range(3))
    thr, amax, acc = (torch.empty(batch, k1, **i32) for _ in range(3))
    # Tensors a launch does not read are replaced by one it has (a kernel needs a pointer).
    drafts = draft_tokens if k > 0 else tokens
    q = draft_probs if (k > 0 and not greedy) else logits
    if q.stride(-1) != 1:
        q = q.contiguous()
    u = uniforms if not greedy else logits
    top_k_t = top_k.contiguous() if top_k is not None else temperature
    top_p_t = top_p.contiguous() if top_p is not None else temperature
    strides = (*logits.stride()[:2], *drafts.stride()[:2], *q.stride()[:2], *u.stride()[:2])
    block = block_v or default_block_v(dev)
    launch = launch_options(dev)
    _position_kernel[(batch, k1)](
        logits, temperature, top_k_t, top_p_t, drafts, q, u, m, logz, z_kept, thr, amax, acc,
        *strides, vocab, k, HAS_TOPK=top_k is not None and not greedy, HAS_TOPP=top_p is not None and not greedy,
        GREEDY=greedy, BLOCK_V=block, NP=N_PIVOTS, **launch)
    _emit_kernel[(batch,)](
        logits, temperature, drafts, q, u, m, logz, z_kept, thr, amax, acc, n_acc, tokens, logprobs,
        *strides, vocab, k, GREEDY=greedy, BLOCK_V=block, BLOCK_K=triton.next_power_of_2(k1), **launch)
    return n_acc, tokens, logprobs


@torch.no_grad()
def probabilities_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None = None,
                         top_p: torch.Tensor | None = None, *, block_v: int | None = None) -> torch.Tensor:
    """`probabilities` of kernels/sampling.py for logits [N, V] from the statistics the
    position kernel leaves (max, kept mass, threshold, argmax): what every acceptance and draw
    of the kernels uses. For tests of the in-kernel filtering; the engine never calls it."""
    n, vocab = logits.shape
    dev = logits.device
    logits = logits.contiguous()
    temperature = temperature.contiguous()
    m, logz, z_kept = (torch.empty(n, 1, device=dev, dtype=torch.float32) for _ in range(3))
    thr, amax, acc = (torch.empty(n, 1, device=dev, dtype=torch.int32) for _ in range(3))
    top_k_t = top_k.contiguous() if top_k is not None else temperature
    top_p_t = top_p.contiguous() if top_p is not None else temperature
    _position_kernel[(n, 1)](
        logits, temperature, top_k_t, top_p_t, amax, logits, logits, m, logz, z_kept, thr, amax, acc,
        vocab, 0, 0, 0, 0, 0, 0, 0, vocab, 0, HAS_TOPK=top_k is not None, HAS_TOPP=top_p is not None,
        GREEDY=False, BLOCK_V=block_v or default_block_v(dev), NP=N_PIVOTS, **launch_options(dev))
    t = temperature.float()[:, None]
    s = logits.float() / torch.where(t > 0, t, 1.0)
    bits = s.view(torch.int32)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    probs = torch.where(key >= thr, torch.exp(s - m) / z_kept, 0.0)
    one_hot = torch.nn.functional.one_hot(amax[:, 0].long(), vocab).float()
    return torch.where(t > 0, probs, one_hot)


__all__ = ["speculative_verify_triton", "probabilities_triton", "default_block_v", "launch_options"]

"""The inference forward of MiMo-V2-Flash in plain PyTorch: main model and MTP layers over a
static KV cache.

The math is the training model's, through the same code where there is code to share: dims
from `ModelConfig.attention_dims`, RoPE from `mimo_train.model.rope`, attention (sinks,
window, GQA, q/k dim != v dim) through the kernels' dispatcher, RMSNorm as torch's (what the
training model's norm is). The router has no plain function on the training side (megatron's
router runs it there), so `route` below is the one copy for inference; it follows transformers'
MiMoV2FlashTopkRouter (the serving reference).

MTP layer k (megatron / vLLM semantics, as tests/model/test_mtp.py pins down): at position t it
takes h_k(t) -- the main model's final-normed hidden for k = 0, else MTP layer k-1's output
after its final_layernorm (cfg.mtp_feed "chained"; with "target_hidden" every layer takes the
main model's hidden before its final norm instead) -- and the token at t+k+1, computes
eh_proj(cat(enorm(embed(token)), hnorm(h_k))), one SWA block with a dense FFN, and
final_layernorm; lm_head of the result predicts the token at t+k+2. RoPE uses position t.

A block is a `BlockKernel` call: static sizes live on the kernel object (one per layer kind),
every tensor (weights, cache, positions) is an argument.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mimo_train.kernels import attention
from mimo_train.kernels.attention import hidden_keys
from mimo_train.model.config import ModelConfig
from mimo_train.model.rope import apply_rope, rope_cos_sin
from mimo_train.rollout.cache import KVCache, Slots
from mimo_train.rollout.weights import BlockWeights, MTPWeights, Weights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def route(x: torch.Tensor, router: torch.Tensor, expert_bias: torch.Tensor,
          cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Router of one MoE layer for tokens x [N, hidden] -> (weights [N, k] fp32, experts [N, k]).

    Sigmoid scores; experts chosen on score + e_score_correction_bias (aux-loss-free balancing:
    the bias steers the choice only); group-limited (n_group > 1: keep the topk_group groups
    with the largest sum of their top-2 biased scores, as transformers and DeepSeek-V3 do);
    weights are the chosen unbiased scores, normalised to sum 1 (norm_topk_prob), times
    routed_scaling_factor. In fp32."""
    scores = F.linear(x.float(), router).sigmoid()
    choice = scores + expert_bias
    if cfg.n_group > 1:
        grouped = choice.view(len(x), cfg.n_group, -1)
        best = grouped.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group, dim=-1).indices
        keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
    experts = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, experts)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, experts


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def experts_forward(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor, path: str) -> torch.Tensor:
    """sum_j weights[:, j] * expert_{experts[:, j]}(x) for x [N, hidden]; w13 [E, 2I, hidden],
    w2 [E, hidden, I]. Two ways to run it, one result:
      "gather"  copy the chosen experts' weights, one batched matmul: no host sync (few tokens
                on a GPU);
      "grouped" sort token slots by expert, one matmul per expert over views of its weights:
                reads the counts on the host, free on CPU, where it is also the fewest bytes."""
    n, k = experts.shape
    num_experts = w13.shape[0]
    if path == "gather":
        flat = experts.flatten()  # index_select: a plain copy, several times faster than w13[flat] on CPU
        h = torch.bmm(x.repeat_interleave(k, 0)[:, None], w13.index_select(0, flat).transpose(1, 2))
        gate, up = h.chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, w2.index_select(0, flat).transpose(1, 2)).view(n, k, -1)
        return (y * weights.to(y.dtype)[..., None]).sum(1)
    order = experts.flatten().argsort()
    counts = torch.bincount(experts.flatten(), minlength=num_experts).tolist()
    token = order // k
    xs, ys, start = x[token], [], 0
    for e, c in enumerate(counts):
        if c:
            ys.append(swiglu(xs[start:start + c], w13[e], w2[e]))
        start += c
    y = torch.cat(ys) * weights.flatten()[order].to(x.dtype)[:, None]
    return torch.zeros_like(x).index_add_(0, token, y)


class BlockKernel:
    """One pre-norm transformer block of a kind: global or SWA attention, dense or MoE FFN."""

    def __init__(self, cfg: ModelConfig, *, swa: bool, moe: bool):
        self.cfg, self.moe = cfg, moe
        d = cfg.attention_dims(swa)
        self.heads, self.kv_heads = d["num_heads"], d["num_kv_heads"]
        self.head_dim, self.v_head_dim = d["head_dim"], d["v_head_dim"]
        self.window, self.value_scale = d["window"], d["value_scale"]
        self.scale = self.head_dim ** -0.5
        self.eps = cfg.layernorm_epsilon
        self.global_cache = not swa

    def __call__(self, x, w: BlockWeights, k_cache, v_cache, write, q_pos, k_pos, cos, sin, bound: int,
                 prefill: bool, hidden=None):
        """x [n, s, hidden] at positions q_pos [n, s]; writes this block's K/V of the s tokens
        into cache rows [0, n) at slots `write`, then attends over keys at k_pos (prefill:
        over the block itself; `hidden`: the attention mask of these positions, if computed
        already). Returns (x, experts [n, s, k] or None)."""
        n, s, _ = x.shape
        a = w.attn
        h = rms_norm(x, w.input_norm, self.eps)
        qkv = F.linear(h, a.qkv)
        # q and k sit side by side in qkv: one RoPE call rotates both.
        qk = qkv[..., :a.split[0] + a.split[1]].view(n, s, self.heads + self.kv_heads, self.head_dim)
        qk = apply_rope(qk, cos, sin)
        q, k = qk[:, :, :self.heads], qk[:, :, self.heads:]
        v = qkv[..., a.split[0] + a.split[1]:].view(n, s, self.kv_heads, self.v_head_dim) * self.value_scale
        rows = torch.arange(n, device=x.device)[:, None]
        k_cache, v_cache = k_cache[:n], v_cache[:n]
        k_cache[rows, write] = k
        v_cache[rows, write] = v
        if prefill:  # fresh rows: the block is all there is to see
            keys, values, k_pos = k, v, q_pos
        elif self.global_cache:
            keys, values = k_cache[:, :bound], v_cache[:, :bound]
        else:
            keys, values = k_cache, v_cache
        out, _ = attention(q, keys, values, scale=self.scale, q_pos=q_pos, k_pos=k_pos, sinks=a.sinks,
                           window=self.window, hidden=hidden)
        x = x + F.linear(out.reshape(n, s, -1), a.o)
        h = rms_norm(x, w.post_norm, self.eps)
        if not self.moe:
            return x + swiglu(h, w.mlp.w13, w.mlp.w2), None
        flat = h.view(n * s, -1)
        weights, experts = route(flat, w.mlp.router, w.mlp.expert_bias, self.cfg)
        # Gather copies the chosen experts' weights: on CPU, where the grouped path's host sync
        # is free, that pays only for a handful of pairs (one decode token); on a GPU it saves
        # the sync for up to E pairs.
        pairs, num_experts = n * s * experts.shape[1], self.cfg.n_routed_experts
        path = "gather" if pairs <= (num_experts if x.is_cuda else num_experts // 4) else "grouped"
        y = experts_forward(flat, weights, experts, w.mlp.w13, w.mlp.w2, path)
        return x + y.view_as(x), experts.view(n, s, -1)


class MTPKernel:
    """One MTP layer: input projection, one SWA dense block, final_layernorm."""

    def __init__(self, cfg: ModelConfig):
        self.block = BlockKernel(cfg, swa=True, moe=False)
        self.eps = cfg.layernorm_epsilon

    def __call__(self, h, emb, m: MTPWeights, k_cache, v_cache, write, q_pos, k_pos, cos, sin, prefill: bool,
                 hidden=None):
        e = rms_norm(emb, m.enorm, self.eps)
        x = F.linear(torch.cat([e, rms_norm(h, m.hnorm, self.eps)], dim=-1), m.eh_proj)
        x, _ = self.block(x, m.block, k_cache, v_cache, write, q_pos, k_pos, cos, sin, 0, prefill, hidden)
        return rms_norm(x, m.final_norm, self.eps)


class InferenceModel:
    """Weights + cache + the forward passes the engine runs."""

    def __init__(self, cfg: ModelConfig, weights: Weights, cache: KVCache):
        self.cfg, self.w, self.cache = cfg, weights, cache
        self.eps = cfg.layernorm_epsilon
        self.dims = {"global": cfg.attention_dims(False), "swa": cfg.attention_dims(True)}
        self.dims["mtp"] = self.dims["swa"]
        self.moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe(i)]
        kinds = {(cfg.is_swa(i), cfg.is_moe(i)) for i in range(cfg.num_hidden_layers)}
        self.kernels = {kind: BlockKernel(cfg, swa=kind[0], moe=kind[1]) for kind in kinds}
        self.mtp_kernel = MTPKernel(cfg)
        # cos / sin of every position the cache can hold, per layer kind: a step looks them up.
        positions = torch.arange(cache.max_len + 1, device=weights.embed.device)
        self.rope = {kind: rope_cos_sin(positions, d["rotary_dim"], d["rope_theta"]) for kind, d in self.dims.items()}

    # ---- slots ---------------------------------------------------------------------------
    def slots(self, rows: slice, pos: torch.Tensor, *, prefill: bool, bound: int = 0, mtp: bool = False) -> Slots:
        """Write indices, key positions and RoPE for one forward; updates the ring labels.

        Prefill mode: rows are fresh, q_pos [n, s] is right-aligned (padding < 0 on the left),
        and only the last `ring` positions of each row are kept in the rings."""
        c = self.cache
        first_kept = pos[:, -1:] - c.ring + 1 if prefill else None
        ring_idx = c.ring_index(pos, first_kept)
        labels = c.mtp_pos if mtp else c.ring_pos
        n = pos.shape[0]
        # Trash writes are labelled empty (-1), whatever their position.
        labels[rows][torch.arange(n, device=pos.device)[:, None], ring_idx] = torch.where(ring_idx == c.ring, -1, pos)
        kinds = ("mtp",) if mtp else ("global", "swa")
        write = {"mtp" if mtp else "swa": ring_idx}
        k_pos: dict[str, torch.Tensor | None] = {k: None for k in kinds}
        if not mtp:
            write["global"] = c.full_index(pos)
        if not prefill:
            k_pos["mtp" if mtp else "swa"] = labels[rows]
            if not mtp:
                k_pos["global"] = torch.arange(bound, device=pos.device).expand(n, bound)
        at = pos.clamp(min=0)  # padding takes position 0's rotation: it is masked anyway
        rope = {kind: (self.rope[kind][0][at], self.rope[kind][1][at]) for kind in kinds}
        # The attention mask of each kind, once for all its layers (prefill: each block's own).
        hidden = {kind: None if prefill else hidden_keys(pos, k_pos[kind], window=self.dims[kind]["window"])
                  for kind in kinds}
        return Slots(rows, pos, write, k_pos, bound, prefill, rope, hidden)

    # ---- model ---------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, s: Slots, routed: list | None = None) -> torch.Tensor:
        """Main model over tokens [n, len] in cache rows s.rows -> final-normed hidden
        [n, len, hidden]. With a list `routed`, appends each MoE layer's experts [n, len, k]."""
        return self.forward_and_feed(tokens, s, routed)[0]

    def forward_and_feed(self, tokens: torch.Tensor, s: Slots,
                         routed: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`, and the hidden state MTP layer 0 reads at each position: the final-normed
        one (chained) or the one before the final norm (target_hidden)."""
        x = F.embedding(tokens.clamp(min=0), self.w.embed)
        for i, b in enumerate(self.w.layers):
            kind = "swa" if b.swa else "global"
            k_cache, v_cache = self.cache.layers[i]
            x, experts = self.kernels[(b.swa, b.moe)](x, b, k_cache[s.rows], v_cache[s.rows], s.write[kind], s.q_pos,
                                                      s.k_pos[kind], *s.rope[kind], s.bound, s.prefill, s.hidden[kind])
            if routed is not None and experts is not None:
                routed.append(experts)
        h = rms_norm(x, self.w.norm, self.eps)
        return h, (x if self.cfg.mtp_feed == "target_hidden" else h)

    def mtp_layer(self, k: int, h: torch.Tensor, tokens: torch.Tensor, s: Slots) -> torch.Tensor:
        """MTP layer k at the block's positions t: h = h_k(t) [n, len, hidden], tokens [n, len]
        = the tokens at t+k+1. Returns the layer's output (after final_layernorm): h_{k+1} when
        chained."""
        k_cache, v_cache = self.cache.mtp[k]
        return self.mtp_kernel(h, F.embedding(tokens.clamp(min=0), self.w.embed), self.w.mtp[k], k_cache[s.rows],
                               v_cache[s.rows], s.write["mtp"], s.q_pos, s.k_pos["mtp"], *s.rope["mtp"], s.prefill,
                               s.hidden["mtp"])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.w.lm_head).float()

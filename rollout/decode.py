"""The device side of the engine: per-slot state and the three passes of an iteration.

`prefill` runs fresh requests' prompts and samples their first token, `decode` drafts K tokens
with the MTP chain, verifies them in one main-model forward and advances every active row. On a
GPU no host synchronisation inside (on CPU the MoE layers read expert counts, free there): the
engine reads the results once per iteration.

Drafting with distinct MTP layers. Layer k at position t reads the token at t+k+1, so with the
last kept token at position L its cache entry at t is final only once t+k+1 <= L: entries at
positions > L-k-1 were computed from drafts (or, after prefill, from placeholders). The chain
that drafts therefore reruns each layer over a block of the last B positions [L-B, L-1], which
rewrites those entries and the positions kept since, and yields the outputs at L-1 the drafts are
read from. The main model's hidden states MTP layer 0 reads (`ModelConfig.mtp_feed`: after the
final norm when chained; before it for target_hidden, where every layer reads them) and the
tokens of the last H positions are kept per row (`hist_h`, `hist_tok`) to feed it. The chain
then runs exactly the training-time computation of each MTP layer, so acceptance matches the
trained accuracy.

Exact whatever the depth history. A step at depth K < max_depth has no use for layers K.., and
a K = 0 step for any; yet a later deeper draft needs their caches complete over the window. Two
exact ways: every step extends every layer (at K = 0 that costs a full chain per token, several
blocks on top of a one-token main forward), or a layer skips steps and catches up over the
positions it missed when it next runs. We catch up, bounded: per row and layer `mtp_upto` is the
first position whose entry is not final, and a layer run over [L-B, L-1] needs B >= L - upto.
That block must fit the history kept (H) and the MTP ring (a query at L-B still sees its window:
ring >= window + B), so H = ring - window; when the deepest layer's lag could pass H by the next
step, this step runs every layer (the catch-up chain, drafting only K). With 3 MTP layers a run
of K = 0 steps pays one 3-layer chain over 7 positions every 5 tokens; at K = max_depth nothing
changes. A layer's entry at t depends on its input at t only, so a catch-up that rewrites all
of [upto, L-1] leaves the cache exactly as if the layer had run every step (the MTP rings' labels
are shared by all MTP layers and stamped by every chain; a slot a skipped layer has not rewritten
yet holds a label in [upto, L-1], so it is rewritten before that layer next reads it).
"""

from __future__ import annotations

import torch

from mimo_train.kernels.sampling import sample, speculative_verify
from mimo_train.model.config import ModelConfig
from mimo_train.rollout.model import InferenceModel
from mimo_train.rollout.rng import uniforms


class SlotState:
    """Tensors with one row per engine slot; rows [0, n) are the active requests."""

    def __init__(self, cfg: ModelConfig, model: InferenceModel, max_batch: int):
        self.cfg, self.model, self.cache = cfg, model, model.cache
        self.max_batch = max_batch
        dev, dtype, Km = model.w.embed.device, model.w.embed.dtype, cfg.num_nextn_predict_layers
        self.device, self.dtype, self.max_depth = dev, dtype, Km
        # The longest block a chain may rerun (see the module docstring): 2 K_max + 1 positions.
        self.H = self.cache.ring - self.cache.window if Km else 0
        self.chained = cfg.mtp_feed == "chained"  # else every MTP layer reads hist_h itself
        # Host-side: per row and MTP layer, the first position whose cache entry is not final.
        self.mtp_upto = torch.zeros(max_batch, Km, dtype=torch.long)
        self.length = torch.zeros(max_batch, dtype=torch.long, device=dev)  # tokens so far, incl. the last sampled
        self.keys = torch.zeros(max_batch, dtype=torch.long, device=dev)  # per-request random streams
        self.counters = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(max_batch, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.top_p = torch.ones(max_batch, dtype=torch.float32, device=dev)
        self.hist_h = torch.zeros(max_batch, self.H, cfg.hidden_size, dtype=dtype, device=dev)  # h_0 at [L-H, L-1]
        self.hist_tok = torch.zeros(max_batch, self.H + 1 + Km, dtype=torch.long, device=dev)  # tokens [L-H, L+Km]
        self.routed: torch.Tensor | None = None  # [B, positions, MoE layers, k], made on first use

    def track_routing(self) -> None:
        if self.routed is None:
            dtype = torch.int16 if self.cfg.n_routed_experts < 2 ** 15 else torch.int32
            self.routed = torch.zeros(self.max_batch, self.cache.max_len + 1, len(self.model.moe_layers),
                                      self.cfg.num_experts_per_tok, dtype=dtype, device=self.device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.length, self.keys, self.counters, self.temperature, self.top_k, self.top_p, self.hist_h,
                self.hist_tok] + ([self.routed] if self.routed is not None else [])

    def move_row(self, src: int, dst: int) -> None:
        self.cache.move_row(src, dst)
        for t in self.tensors() + [self.mtp_upto]:
            t[dst].copy_(t[src])

    # ---- prefill -------------------------------------------------------------------------
    def prefill(self, n0: int, prompts: list[list[int]], params, keys: list[int], greedy: bool, use_top_k: bool,
                use_top_p: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh requests into rows [n0, n0 + m): prefill the main model over the prompts,
        sample the first token (returned with its log-prob, [m] each), prefill the MTP caches."""
        m, dev, H, Km = len(prompts), self.device, self.H, self.max_depth
        rows = slice(n0, n0 + m)
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        width = max(max(map(len, prompts)), H)
        pos = torch.arange(width, device=dev) - (width - lens)[:, None]  # right-aligned, < 0 = padding
        tokens = torch.zeros(m, width, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p):] = torch.tensor(p, device=dev)
        self.temperature[rows] = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        self.top_k[rows] = torch.tensor([p.top_k for p in params])
        self.top_p[rows] = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        self.keys[rows] = torch.tensor(keys)
        self.counters[rows] = 0
        self.cache.reset_rows(rows)
        s = self.model.slots(rows, pos, prefill=True)
        routed = [] if self.routed is not None else None
        h, feed = self.model.forward_and_feed(tokens, s, routed)
        u = uniforms(self.keys[rows], self.counters[rows], 2 * Km + 1)
        self.counters[rows] += 1
        _, first, logprobs = speculative_verify(
            self.model.logits(h[:, -1:]), tokens[:, :0], None, self.temperature[rows],
            self.top_k[rows] if use_top_k else None, self.top_p[rows] if use_top_p else None, u[:, Km:Km + 1],
            greedy=greedy)
        self.length[rows] = lens + 1
        seq = torch.cat([tokens, first[:, :1], torch.zeros(m, Km, dtype=torch.long, device=dev)], dim=1)
        self.hist_tok[rows, :H + 1] = seq[:, width - H:width + 1]
        if Km:
            self.hist_h[rows] = feed[:, width - H:]
            # MTP caches over the prompt; layer k's entries past L-k-1 (L = len(prompt), the
            # first sampled token) read placeholder drafts (zeros) and are not final yet.
            sm = self.model.slots(rows, pos, prefill=True, mtp=True)
            h = feed
            for k in range(Km):
                out = self.model.mtp_layer(k, h, seq[:, k + 1:k + 1 + width], sm)
                h = out if self.chained else feed
            self.mtp_upto[rows] = torch.tensor([len(p) for p in prompts])[:, None] - torch.arange(Km)
        if routed is not None:
            idx = torch.where(pos >= 0, pos, self.cache.max_len)
            self.routed[rows][torch.arange(m, device=dev)[:, None], idx] = torch.stack(routed, 2).to(self.routed.dtype)
        return first[:, 0], logprobs[:, 0]

    # ---- decode --------------------------------------------------------------------------
    def decode(self, n: int, K: int, bound: int, greedy: bool, use_top_k: bool, use_top_p: bool,
               lengths: list[int]):
        """Draft K tokens for rows [0, n), verify them, advance the rows. `lengths` are the rows'
        token counts (prompt + generated) as the host knows them, so the chain's block size needs
        no device read. Returns n_accepted [n], tokens [n, K+1] and log-probs [n, K+1] as
        `speculative_verify` defines them."""
        # Greedy steps need no randomness; sampled ones take the rows' next uniforms.
        u = None if greedy else uniforms(self.keys[:n], self.counters[:n], 2 * self.max_depth + 1)
        self.counters[:n] += 1
        top_k = self.top_k[:n] if use_top_k else None
        top_p = self.top_p[:n] if use_top_p else None
        layers, block = self.chain_plan(n, K, lengths)
        drafts, draft_probs = self._draft_step(n, K, layers, block, u, top_k, top_p) if layers else \
            (self.hist_tok[:n, :0], None)
        if layers:
            last = torch.tensor(lengths[:n]) - 1
            self.mtp_upto[:n, :layers] = last[:, None] - torch.arange(layers)
        return self._verify_step(n, K, bound, drafts, draft_probs, u, top_k, top_p)

    def chain_plan(self, n: int, K: int, lengths: list[int]) -> tuple[int, int]:
        """(J, B): this step runs MTP layers 0..J-1 over each row's last B positions. J is K,
        or every layer when the deepest one could otherwise lag past H by the next step (a
        step keeps at most K+1 tokens); B covers every position a running layer has not
        finalised (at least the last one, whose output the draft is read from)."""
        Km = self.max_depth
        if not Km:
            return 0, 0
        last = torch.tensor(lengths[:n]) - 1
        lag = last[:, None] - self.mtp_upto[:n]  # [n, Km], non-decreasing in the layer
        layers = Km if int(lag[:, -1].max()) + K + 1 > self.H else K
        block = max(1, int(lag[:, layers - 1].max())) if layers else 0
        assert block <= self.H, f"MTP chain of {block} positions outgrew the history kept ({self.H})"
        return layers, block

    def _draft_step(self, n: int, K: int, layers: int, B: int, u, top_k, top_p):
        """Run MTP layers 0..layers-1 over positions [L-B, L-1], drafting with the first K;
        returns drafts [n, K] and the distributions they were drawn from [n, K, V] (None when
        greedy). Layers past K read stale draft slots at positions past L+K: those feed only
        entries the next run rewrites."""
        H = self.H
        pos = (self.length[:n] - 1 - B)[:, None] + torch.arange(B, device=self.device)
        s = self.model.slots(slice(0, n), pos, prefill=False, mtp=True)
        tok = self.hist_tok[:n, H - B:]  # tok[:, B] is the last kept token
        h = feed = self.hist_h[:n, H - B:]
        drafts, probs = [], []
        for k in range(layers):
            out = self.model.mtp_layer(k, h, tok[:, k + 1:k + 1 + B], s)
            h = out if self.chained else feed
            if k >= K:
                continue
            logits = self.model.logits(out[:, -1])
            if u is None:
                d = logits.argmax(-1)
            else:
                d, q = sample(logits, self.temperature[:n], top_k, top_p, u[:, k])
                probs.append(q)
            tok[:, B + 1 + k] = d  # layer k+1 reads it at its last position
            drafts.append(d)
        if not drafts:
            return self.hist_tok[:n, :0], None
        return torch.stack(drafts, 1), (torch.stack(probs, 1) if probs else None)

    def _verify_step(self, n: int, K: int, bound: int, drafts, draft_probs, u, top_k, top_p):
        """Main model over [last token, drafts] at positions L..L+K, speculative verification,
        then the rows move on by the kept tokens."""
        Km, H, dev = self.max_depth, self.H, self.device
        pos = (self.length[:n] - 1)[:, None] + torch.arange(K + 1, device=dev)
        s = self.model.slots(slice(0, n), pos, prefill=False, bound=bound)
        routed = [] if self.routed is not None else None
        h, feed = self.model.forward_and_feed(self.hist_tok[:n, H:H + K + 1], s, routed)
        n_acc, out, logprobs = speculative_verify(
            self.model.logits(h), drafts, draft_probs, self.temperature[:n], top_k, top_p,
            u[:, Km:Km + K + 1] if u is not None else None, greedy=u is None)

        # Keep the window of the last H positions (hidden) / H+1 tokens, shifted by n_acc + 1.
        shift = (n_acc + 1)[:, None]
        if Km:
            window = shift + torch.arange(H, device=dev)
            hist = torch.cat([self.hist_h[:n], feed.to(self.dtype)], dim=1)
            self.hist_h[:n] = hist.gather(1, window[..., None].expand(-1, -1, hist.shape[-1]))
        toks = torch.cat([self.hist_tok[:n, :H + 1], out.clamp(min=0)], dim=1)
        self.hist_tok[:n, :H + 1] = toks.gather(1, shift + torch.arange(H + 1, device=dev))
        self.length[:n] += n_acc + 1
        self.cache.rollback(n, self.length[:n] - 2)  # the new last token has no KV yet
        if routed is not None:
            rows = torch.arange(n, device=dev)[:, None]
            self.routed[rows, pos] = torch.stack(routed, dim=2).to(self.routed.dtype)
        return n_acc, out, logprobs

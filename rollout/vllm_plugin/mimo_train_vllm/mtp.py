"""MiMo-V2 MTP drafting in vLLM with every MTP layer, computed as megatron trains them.

vLLM 0.32's MiMo-V2 drafter builds one MTP layer and reuses it for every draft step. Trained
(megatron-core, our trainer and engine), MTP layer k at position t reads the post-final-norm
output of layer k-1 at t (layer 0: the target model's hidden state) and the embedding of token
t+k+1, and attends to its own outputs at positions <= t. Drafting K tokens after the last
verified position L runs layer k at t = L, and needs layer k's keys at every t < L.

vLLM's proposer runs the drafter once over the newly verified rows (the first pass), then once
per further draft with one row per request at the next position. This drafter computes, at EVERY
row of vLLM position q (input token x_{q+1}), every layer k whose trained position t = q - k it
can: layer k at t = q reads token t+k+1 = x_{q+1} (the row's own token) and layer k-1's output
at t, which the row at q-1 computed. So one row computes a diagonal of the trained computation,
each layer's keys land at vLLM position t + k (relative positions, hence RoPE and the sliding
window, are those of training), and draft step j reads layer j at t = L (row L + j). In the first
pass every row holds a verified token, so every layer's keys at positions <= L are exact; in a
draft step j, layers k >= j run on the draft tokens, exactly as our engine's draft chain does.

What vLLM does not provide, this module keeps itself, keyed by KV-cache slot (so prefix caching
and chunked prefill work unchanged): each layer's keys and values (its attention is computed
here, over slots read from vLLM's block table, excluding the positions q < k that have no
trained counterpart; only layer 0 keeps a vLLM attention layer, whose metadata this reads) and
each row's layer outputs (the next row's inputs). Both are sized by the largest slot used,
outside vLLM's memory planning: per slot, K x (hidden + KV of one layer).

The proposer does not tell a model which draft step it runs; `install` wraps its `propose` to
count them. Outside `propose` (profiling, warm-up) the drafter runs MTP layer 0 only, as stock.
Set MIMO_VLLM_STOCK_MTP=1 in the server's environment to keep vLLM's own drafter.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.mimo_v2_mtp import MiMoV2MTP, _MiMoV2MTPLayers
from vllm.model_executor.models.utils import maybe_prefix

_STEP: list[int | None] = [None]  # the proposer's draft step: 0 = first pass, j = j-th further draft


def install() -> None:
    """Replace vLLM's MiMo-V2 MTP drafter with `ChainedMiMoV2MTP` (called by `register`)."""
    if os.environ.get("MIMO_VLLM_STOCK_MTP") == "1":
        return
    from vllm import ModelRegistry
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    ModelRegistry.register_model("MiMoV2MTPModel", "mimo_train_vllm.mtp:ChainedMiMoV2MTP")
    original = SpecDecodeBaseProposer.propose
    if getattr(original, "_mimo_steps", False):  # plugins may load more than once per process
        return

    def propose(self, *args, **kwargs):
        _STEP[0] = 0
        try:
            return original(self, *args, **kwargs)
        finally:
            _STEP[0] = None

    propose._mimo_steps = True
    SpecDecodeBaseProposer.propose = propose


class _SlotBuffer:
    """A zero-initialised tensor [slots, *shape] that grows to the largest slot used."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape, self.data = shape, None

    def _cover(self, slots: torch.Tensor, like: torch.Tensor) -> None:
        need = int(slots.max()) + 1 if slots.numel() else 0
        if self.data is None or self.data.shape[0] < need:
            size = max(need, 2 * (0 if self.data is None else self.data.shape[0]), 1024)
            grown = torch.zeros(size, *self.shape, dtype=like.dtype, device=like.device)
            if self.data is not None:
                grown[:self.data.shape[0]] = self.data
            self.data = grown

    def write(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        self._cover(slots, values)
        self.data.index_copy_(0, slots, values.to(self.data.dtype))

    def read(self, slots: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Rows at `slots` (zeros where never written), in `like`'s dtype."""
        self._cover(slots, like)
        return self.data.index_select(0, slots.reshape(-1)).view(*slots.shape, *self.shape).to(like.dtype)


class ChainedPredictor(nn.Module):
    """MTP layers 0..K-1 (K = the draft depth, at most the checkpoint's layers), chained."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        spec = vllm_config.speculative_config
        trained = int(getattr(spec.target_model_config.hf_config, "num_nextn_predict_layers", 1) or 1)
        feed = getattr(spec.target_model_config.hf_config, "mtp_feed", "chained")
        if feed != "chained":
            raise ValueError(f"config.json says mtp_feed={feed!r}, but this drafter (like vLLM's own) chains the MTP "
                             "layers: serve this checkpoint without speculative decoding, or with SGLang's "
                             "multi-layer EAGLE, or draft with mimo_train's engine (rollout.backend=native)")
        if spec.num_speculative_tokens > trained:
            raise ValueError(f"num_speculative_tokens={spec.num_speculative_tokens} but the checkpoint has {trained} "
                             f"MTP layers: draft at most {trained} tokens (mimo_train_vllm's chained drafter)")
        self.num_mtp_layers = spec.num_speculative_tokens
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.mtp = _MiMoV2MTPLayers(config=config, num_mtp_layers=self.num_mtp_layers,
                                    cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config,
                                    prefix=maybe_prefix(prefix, "mtp.layers"))
        # Only layer 0 keeps vLLM's attention layer (vLLM builds the drafter's attention metadata
        # from it, and profiling runs it); the others attend through this module alone. vLLM
        # requires every drafting attention layer in one KV-cache group, which a hybrid model's
        # grouping does not give three of them.
        static = vllm_config.compilation_config.static_forward_context
        for k in range(1, self.num_mtp_layers):
            attn = self.mtp.layers[str(k)].self_attn
            static.pop(attn.attn.layer_name, None)
            del attn.attn
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.block_size = vllm_config.cache_config.block_size
        self.window = int(config.sliding_window_size)  # vLLM's meaning: keys per query, the query included
        attn = self.mtp.layers["0"].self_attn
        kv = (attn.num_kv_heads, attn.head_dim + attn.v_head_dim)
        self.kv = [_SlotBuffer(kv) for _ in range(self.num_mtp_layers)]
        self.outputs = _SlotBuffer((self.num_mtp_layers, config.hidden_size))
        print(f"mimo_train_vllm: chained MTP drafter, {self.num_mtp_layers} layers", flush=True)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def compute_logits(self, hidden_states, lm_head, spec_step_idx: int = 0):
        return self.logits_processor(lm_head, hidden_states)

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, input_ids, positions, previous_hidden_states, inputs_embeds=None, spec_step_idx: int = 0):
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        step = _STEP[0]
        if step is None:  # profiling / warm-up: the stock computation
            return self.mtp.layers["0"](inputs_embeds, positions, previous_hidden_states)
        _STEP[0] = step + 1
        meta = self._metadata()
        n = int(meta.num_actual_tokens)
        out = torch.zeros_like(previous_hidden_states)
        if n == 0:
            return out
        pos, here = positions[:n].long(), meta.slot_mapping[:n].long()
        rows = torch.arange(n, device=pos.device)
        # The request of each row: several rows each in the first pass, one in further drafts.
        req = torch.searchsorted(meta.query_start_loc[1:].long(), rows, right=True) if step == 0 else rows
        first = torch.ones(n, dtype=torch.bool, device=pos.device)  # a request's first row in this call
        if step == 0:
            first[1:] = req[1:] != req[:-1]
        table = meta.block_table
        computed = self._slots(table, req, pos)
        if not torch.equal(computed[here >= 0], here[here >= 0]):  # the block-table reading below relies on it
            raise RuntimeError("mimo_train_vllm: slots from the block table differ from vLLM's slot mapping "
                               f"(block size {self.block_size} assumed)")
        before = self._slots(table, req, pos - 1)
        prev = self.outputs.read(before.clamp(min=0), previous_hidden_states)  # [n, K, hidden] of the rows at q-1
        emb = inputs_embeds[:n]
        results = torch.zeros(n, self.num_mtp_layers, out.shape[-1], dtype=out.dtype, device=out.device)
        h = None  # layer k-1's outputs at these rows
        for k in range(step, self.num_mtp_layers):
            if k == 0:
                h_in = previous_hidden_states[:n]
            elif h is None:  # the first layer of a further draft: its input is the previous row's
                h_in = prev[:, k - 1]
            else:  # layer k at row q reads layer k-1 at row q-1: this call's previous row, or stored
                shifted = torch.cat([torch.zeros_like(h[:1]), h[:-1]])
                h_in = torch.where(first[:, None], prev[:, k - 1], shifted)
            h = self._layer(k, emb, pos, h_in, here, req, table)
            results[:, k] = h
        ok = here >= 0
        self.outputs.write(here[ok], results[ok])
        out[:n] = results[:, step]
        return out

    def _slots(self, table, req, pos):
        """KV-cache slot of each (request, position); -1 for negative positions."""
        p = pos.clamp(min=0)
        slots = table[req, p // self.block_size].long() * self.block_size + p % self.block_size
        return torch.where(pos >= 0, slots, torch.full_like(slots, -1))

    def _metadata(self):
        from vllm.forward_context import get_forward_context

        meta = get_forward_context().attn_metadata
        if isinstance(meta, list):
            raise RuntimeError("mimo_train_vllm's chained MTP drafter does not support micro-batching (ubatching)")
        return meta[self.mtp.layers["0"].self_attn.attn.layer_name]

    def _layer(self, k, emb, pos, h_prev, here, req, table) -> torch.Tensor:
        """MiMoV2MTPLayer.forward, with the attention computed over this module's keys."""
        layer = self.mtp.layers[str(k)]
        h, _ = layer.eh_proj(torch.cat([layer.enorm(emb), layer.hnorm(h_prev)], dim=-1))
        residual = h
        h = self._attention(k, layer.self_attn, pos, layer.input_layernorm(h), here, req, table)
        h, residual = layer.pre_mlp_layernorm(h, residual)
        h = layer.mlp(h) + residual
        return layer.final_layernorm(h)

    def _attention(self, k, attn, pos, x, here, req, table) -> torch.Tensor:
        qkv, _ = attn.qkv_proj(x)
        q, key, v = qkv.split([attn.q_size, attn.k_size, attn.v_size], dim=-1)
        q, key = attn.rotary_emb(pos, q, key)
        if attn.v_scale is not None:
            v = v * attn.v_scale
        n, H, G, D, Dv = x.shape[0], attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.v_head_dim
        ok = here >= 0
        self.kv[k].write(here[ok], torch.cat([key.view(n, G, D), v.view(n, G, Dv)], -1)[ok])
        # Keys at positions q - window + 1 .. q that have a trained counterpart (position >= k).
        kp = pos[:, None] - torch.arange(self.window, device=pos.device)
        valid = kp >= k
        slots = self._slots(table, req[:, None].expand_as(kp), kp)
        kv = self.kv[k].read(torch.where(valid, slots, torch.zeros_like(slots)), q).float()  # [n, W, G, D + Dv]
        keys, values = kv[..., :D], kv[..., D:]
        qh = q.view(n, G, H // G, D).float()
        scores = torch.einsum("nghd,nwgd->nghw", qh, keys) * attn.scaling
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        if attn.attention_sink_bias is not None:  # a logit per head that takes mass and carries no value
            sink = attn.attention_sink_bias.float().view(1, G, H // G, 1).expand(n, -1, -1, 1)
            probs = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)
        o = torch.einsum("nghw,nwgd->nghd", probs, values).reshape(n, H * Dv).to(x.dtype)
        return attn.o_proj(o)[0]


class ChainedMiMoV2MTP(MiMoV2MTP):
    """vLLM's MiMoV2MTP (weight loading, logits) around the chained predictor."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        nn.Module.__init__(self)  # not MiMoV2MTP's: it would build vLLM's one-layer predictor
        self.config = vllm_config.model_config.hf_config
        self.model = ChainedPredictor(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(self.config.vocab_size, self.config.hidden_size,
                                      prefix=maybe_prefix(prefix, "lm_head"))

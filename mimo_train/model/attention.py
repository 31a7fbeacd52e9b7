"""MiMo-V2-Flash self-attention as a megatron-core module.

megatron-core's `SelfAttention` has one head geometry, one RoPE and one window for the whole
model; MiMo-V2-Flash needs, per layer kind: its own kv-head count, q/k head dim != v head dim,
partial RoPE with its own theta, a value scale, and learnable sinks on SWA layers only. This
module keeps megatron's tensor-parallel linears (heads split over TP ranks, sequence parallel
handled by the linears) and does the rest itself; the attention math goes through the
kernels' dispatcher.

Positions come from `packed_seq_params` (cu_seqlens: positions restart and attention stops at
each boundary) or, without it, are 0..s-1 for every row.

Selective recompute (`parallel.recompute=selective`, megatron's `recompute_modules` holding
"core_attn"): megatron applies it inside its own attention class only, so this module does it
itself. The core attention (the kernel call) keeps only its inputs for backward and runs again
there: on the reference path that drops the [heads, s, s] scores and probabilities each layer
would otherwise keep; the Triton kernel keeps no scores anyway, so on GPU it only costs time.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from mimo_train.kernels import attention as attention_kernel
from mimo_train.model.config import ModelConfig
from mimo_train.model.rope import apply_rope, rope_cos_sin


def positions_and_segments(seq_len: int, batch: int, packed_seq_params, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token positions [b, s] and segment ids [b, s] (None when not packed)."""
    if packed_seq_params is None:
        return torch.arange(seq_len, device=device).expand(batch, seq_len), None
    cu = packed_seq_params.cu_seqlens_q.to(device=device, dtype=torch.long)
    if batch != 1 or int(cu[-1]) != seq_len:
        raise ValueError(f"packed sequences need batch 1 and cu_seqlens ending at {seq_len}, "
                         f"got batch {batch} and cu_seqlens {cu.tolist()}")
    lengths = cu[1:] - cu[:-1]
    segments = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    positions = torch.arange(seq_len, device=device) - cu[:-1][segments]
    return positions[None], segments[None]


class MiMoAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int = 1,
        *,
        model_config: ModelConfig,
        swa: bool,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        pg_collection=None,
        **unused,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.tp_group = pg_collection.tp if pg_collection is not None else parallel_state.get_tensor_model_parallel_group()
        tp_size = self.tp_group.size()
        dims = model_config.attention_dims(swa)
        self.swa = swa
        for what in ("num_heads", "num_kv_heads"):
            if dims[what] % tp_size:
                kind = "SWA" if swa else "global"
                raise ValueError(f"{kind} attention has {dims[what]} {what.replace('num_', '')}, not divisible by "
                                 f"tensor-parallel size {tp_size}; use a TP size that divides it")
        self.heads = dims["num_heads"] // tp_size
        self.kv_heads = dims["num_kv_heads"] // tp_size
        self.head_dim, self.v_head_dim = dims["head_dim"], dims["v_head_dim"]
        self.rotary_dim, self.rope_theta = dims["rotary_dim"], dims["rope_theta"]
        self.window, self.value_scale = dims["window"], dims["value_scale"]
        self.scale = self.head_dim ** -0.5
        self.recompute_core_attention = (config.recompute_granularity == "selective"
                                         and "core_attn" in (config.recompute_modules or []))

        h = config.hidden_size
        column = dict(config=config, init_method=config.init_method, bias=False, gather_output=False,
                      skip_bias_add=False, is_expert=False, tp_group=self.tp_group)
        self.linear_q = ColumnParallelLinear(h, dims["num_heads"] * self.head_dim, **column)
        self.linear_k = ColumnParallelLinear(h, dims["num_kv_heads"] * self.head_dim, **column)
        self.linear_v = ColumnParallelLinear(h, dims["num_kv_heads"] * self.v_head_dim, **column)
        self.linear_proj = RowParallelLinear(
            dims["num_heads"] * self.v_head_dim, h, config=config, init_method=config.output_layer_init_method,
            bias=False, input_is_parallel=True, skip_bias_add=True, is_expert=False, tp_group=self.tp_group)

        if dims["sinks"]:
            # Initialise all heads' sinks on every rank, then keep this rank's: the same values as
            # a one-process run with the same seed, whatever the TP size.
            full = torch.empty(dims["num_heads"], dtype=config.params_dtype)
            torch.nn.init.normal_(full, mean=0.0, std=config.init_method_std)
            rank = self.tp_group.rank()
            self.sinks = torch.nn.Parameter(full[rank * self.heads:(rank + 1) * self.heads].clone())
            set_tensor_model_parallel_attributes(self.sinks, is_parallel=True, dim=0, stride=1)
        else:
            self.sinks = None

    def forward(self, hidden_states, attention_mask=None, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, packed_seq_params=None, sequence_len_offset=None, **unused):
        if inference_context is not None:
            raise ValueError("MiMoAttention has no megatron inference path; use mimo_train.rollout for generation")
        q, _ = self.linear_q(hidden_states)  # [s, b, heads * head_dim]: sequence parallel gathered
        k, _ = self.linear_k(hidden_states)
        v, _ = self.linear_v(hidden_states)
        s, b = q.shape[:2]
        q = q.view(s, b, self.heads, self.head_dim).transpose(0, 1)
        k = k.view(s, b, self.kv_heads, self.head_dim).transpose(0, 1)
        v = v.view(s, b, self.kv_heads, self.v_head_dim).transpose(0, 1) * self.value_scale

        pos, seg = positions_and_segments(s, b, packed_seq_params, q.device)
        cos, sin = rope_cos_sin(pos, self.rotary_dim, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if self.recompute_core_attention and self.training and torch.is_grad_enabled():
            # No randomness inside (no attention dropout): nothing to replay but the inputs.
            out = torch.utils.checkpoint.checkpoint(self.core_attention, q, k, v, pos, seg,
                                                    use_reentrant=False, preserve_rng_state=False)
        else:
            out = self.core_attention(q, k, v, pos, seg)
        out = out.transpose(0, 1).reshape(s, b, self.heads * self.v_head_dim)
        return self.linear_proj(out)

    def core_attention(self, q, k, v, pos, seg):
        """[b, s, heads, v_head_dim] from [b, s, heads or kv heads, dim] q, k, v."""
        out, _ = attention_kernel(q, k, v, scale=self.scale, q_pos=pos, k_pos=pos, sinks=self.sinks,
                                  window=self.window, q_seg=seg, k_seg=seg, lse=False)
        return out

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sharded = {}
        for name, module in self.named_children():
            sharded.update(module.sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        if self.sinks is not None:
            dp_cp_group = (metadata or {}).get("dp_cp_group") or parallel_state.get_data_parallel_group(
                with_context_parallel=True)
            sharded.update(make_sharded_tensors_for_checkpoint(
                {"sinks": self.sinks}, prefix, {"sinks": 0}, sharded_offsets,
                tp_group=self.tp_group, dp_cp_group=dp_cp_group))
        return sharded

"""From a `ModelConfig` to what megatron-core builds: its TransformerConfig and module specs.

megatron-core's own modules are used where they fit (TransformerLayer, RMSNorm, dense MLP,
MoELayer with its sigmoid router and aux-loss-free expert bias, the MTP block); attention is
our `MiMoAttention`, chosen per layer: global or SWA. MTP layers are SWA + dense FFN. Norms are
`mimo_train.model.norm.RMSNorm` (torch's RMSNorm that also runs under sequence parallelism).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from mimo_train.model.attention import MiMoAttention
from mimo_train.model.config import ModelConfig
from mimo_train.model.experts import GroupedExperts
from mimo_train.model.norm import replace_norms
from mimo_train.parallel.setup import expert_tp


@dataclass
class MegatronOptions:
    """How megatron-core builds and runs the model: parallel layout, precision, MTP loss, MoE."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    virtual_pp: int | None = None
    sequence_parallel: bool = False
    bf16: bool = False
    mtp_loss_scaling_factor: float = 0.3
    expert_bias_update_rate: float = 1e-3
    # None: megatron's "allgather" dispatcher where no token leaves the rank (ep = tp = 1: it only
    # permutes, where "alltoall" also re-sorts and copies the tokens per expert and back; the
    # same result bit for bit, in less time), "alltoall" otherwise.
    moe_dispatcher: str | None = None
    recompute: str | None = None  # None, "full" or "selective" (MiMoAttention recomputes its core)


def transformer_config(cfg: ModelConfig, opt: MegatronOptions | None = None) -> TransformerConfig:
    opt = opt or MegatronOptions()
    if not cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        raise ValueError("norm_topk_prob=False is not supported: megatron-core's sigmoid router always "
                         "normalises the top-k weights; set norm_topk_prob: true")
    if cfg.norm_topk_prob and cfg.num_experts_per_tok == 1 and any(cfg.moe_layer_freq):
        raise ValueError("num_experts_per_tok=1 with norm_topk_prob: megatron-core's sigmoid router weights the "
                         "single expert by its score, the reference by 1.0; use top-k >= 2")
    dtype = torch.bfloat16 if opt.bf16 else torch.float32
    has_moe = any(cfg.moe_layer_freq)
    grouped = cfg.n_group > 1
    recompute = {}
    if opt.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif opt.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    elif opt.recompute is not None:
        raise ValueError(f"recompute must be null, 'full' or 'selective', got {opt.recompute!r}")
    return TransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.layernorm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.initializer_range,
        params_dtype=dtype,
        bf16=opt.bf16,
        pipeline_dtype=dtype,
        # Initialise full tensors on CPU and split them: the same weights for any TP/EP layout.
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=opt.tp,
        pipeline_model_parallel_size=opt.pp,
        virtual_pipeline_model_parallel_size=opt.virtual_pp,
        expert_model_parallel_size=opt.ep,
        expert_tensor_parallel_size=expert_tp(opt.tp, opt.ep),
        sequence_parallel=opt.sequence_parallel,
        num_moe_experts=cfg.n_routed_experts if has_moe else None,
        moe_layer_freq=list(cfg.moe_layer_freq),
        moe_ffn_hidden_size=cfg.moe_intermediate_size if has_moe else None,
        moe_router_topk=cfg.num_experts_per_tok,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=opt.expert_bias_update_rate,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_topk_scaling_factor=cfg.routed_scaling_factor,
        moe_router_num_groups=cfg.n_group if grouped else None,
        moe_router_group_topk=cfg.topk_group if grouped else None,
        moe_grouped_gemm=False,
        moe_token_dispatcher_type=opt.moe_dispatcher or ("allgather" if opt.ep == opt.tp == 1 else "alltoall"),
        mtp_num_layers=cfg.num_nextn_predict_layers or None,
        mtp_loss_scaling_factor=opt.mtp_loss_scaling_factor,
        **recompute,
    )


def layer_spec(cfg: ModelConfig, *, swa: bool, moe: bool) -> ModuleSpec:
    """A TransformerLayer: RMSNorm -> MiMoAttention -> RMSNorm -> dense MLP or MoE (megatron's
    router and token dispatcher, our GroupedExperts)."""
    base = get_gpt_layer_local_spec(
        num_experts=cfg.n_routed_experts if moe else None, moe_grouped_gemm=False, normalization="RMSNorm")
    attention = ModuleSpec(module=MiMoAttention,
                           params={"model_config": cfg, "swa": swa, "attn_mask_type": AttnMaskType.causal})
    mlp = base.submodules.mlp
    if moe:  # megatron's SequentialMLP with its parameters, run as grouped matmuls (experts.py)
        experts = dataclasses.replace(mlp.submodules.experts, module=GroupedExperts)
        mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, experts=experts))
    submodules = dataclasses.replace(base.submodules, self_attention=attention, mlp=mlp,
                                     sharded_state_dict_keys_map={})
    return replace_norms(ModuleSpec(module=base.module, submodules=submodules))


def decoder_block_spec(cfg: ModelConfig, config: TransformerConfig, vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """The layers this pipeline stage builds."""
    specs = [layer_spec(cfg, swa=cfg.is_swa(i), moe=cfg.is_moe(i)) for i in range(cfg.num_hidden_layers)]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=specs[offset:offset + count], layer_norm=replace_norms(
        get_gpt_layer_local_spec(normalization="RMSNorm").submodules.input_layernorm))


def mtp_block_spec(cfg: ModelConfig, config: TransformerConfig, vp_stage: int | None = None):
    """MTP layers (SWA attention with sinks + dense FFN), or None on stages without them."""
    if not cfg.num_nextn_predict_layers:
        return None
    return replace_norms(get_gpt_mtp_block_spec(config, layer_spec(cfg, swa=True, moe=False),
                                                use_transformer_engine=False, vp_stage=vp_stage))

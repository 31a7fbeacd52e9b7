"""The rollout engine's weights: fused tensors for a fast inference path, addressed by the
HF serving names (the names export writes and weight sync streams).

q/k/v of a layer live in one matrix (one matmul per layer instead of three), gate/up in one,
and the experts of a MoE layer are stacked. `Weights.views` maps every serving name to a view
of these tensors, so loading, `update_weights` and cross-process sync are one `copy_` per name,
with no second copy of the model. The name set is checked against `hf_mapping.hf_names`, the
one list of serving names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mimo_train.model.config import ModelConfig
from mimo_train.model.hf_mapping import QUANT_SUFFIXES, QUANTISED_HINT, WeightNameError, hf_names


@dataclass
class AttentionWeights:
    qkv: torch.Tensor  # [H*dk + Hkv*dk + Hkv*dv, hidden]
    o: torch.Tensor  # [hidden, H*dv]
    sinks: torch.Tensor | None  # [H] (fp32) or None
    split: tuple[int, int, int]  # output sizes of q, k, v in qkv


@dataclass
class MLPWeights:
    w13: torch.Tensor  # dense [2I, hidden] | MoE [E, 2I, hidden]: gate rows, then up rows
    w2: torch.Tensor  # dense [hidden, I] | MoE [E, hidden, I]
    router: torch.Tensor | None = None  # [E, hidden], fp32 (the router runs in fp32)
    expert_bias: torch.Tensor | None = None  # [E] fp32: e_score_correction_bias


@dataclass
class BlockWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor  # post_attention_layernorm (pre_mlp_layernorm in MTP layers)
    attn: AttentionWeights
    mlp: MLPWeights
    swa: bool
    moe: bool


@dataclass
class MTPWeights:
    enorm: torch.Tensor
    hnorm: torch.Tensor
    eh_proj: torch.Tensor  # [hidden, 2 * hidden]: cat(enorm(embed), hnorm(h)) -> hidden
    final_norm: torch.Tensor
    block: BlockWeights


@dataclass
class Weights:
    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor
    layers: list[BlockWeights]
    mtp: list[MTPWeights]
    views: dict[str, torch.Tensor] = field(default_factory=dict)  # serving name -> view


def allocate(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype) -> Weights:
    """Uninitialised weights for cfg (fill them with `load`)."""
    views: dict[str, torch.Tensor] = {}
    hidden = cfg.hidden_size

    def empty(*shape, dt=dtype):
        return torch.empty(shape, device=device, dtype=dt)

    def named(name: str, tensor: torch.Tensor) -> torch.Tensor:
        views[name] = tensor
        return tensor

    def rows(name_sizes: list[tuple[str, int]], tensor: torch.Tensor) -> torch.Tensor:
        """Register consecutive row blocks (along dim -2) of a fused tensor under their names."""
        start = 0
        for name, size in name_sizes:
            views[name] = tensor.narrow(-2, start, size)
            start += size
        return tensor

    def block(prefix: str, swa: bool, moe: bool, mtp: bool) -> BlockWeights:
        d = cfg.attention_dims(swa)
        split = (d["num_heads"] * d["head_dim"], d["num_kv_heads"] * d["head_dim"], d["num_kv_heads"] * d["v_head_dim"])
        a = f"{prefix}self_attn."
        attn = AttentionWeights(
            qkv=rows([(f"{a}q_proj.weight", split[0]), (f"{a}k_proj.weight", split[1]),
                      (f"{a}v_proj.weight", split[2])], empty(sum(split), hidden)),
            o=named(f"{a}o_proj.weight", empty(hidden, d["num_heads"] * d["v_head_dim"])),
            sinks=named(f"{a}attention_sink_bias", empty(d["num_heads"], dt=torch.float32)) if d["sinks"] else None,
            split=split)
        m = f"{prefix}mlp."
        if moe:
            inter, experts = cfg.moe_intermediate_size, cfg.n_routed_experts
            w13, w2 = empty(experts, 2 * inter, hidden), empty(experts, hidden, inter)
            for e in range(experts):
                rows([(f"{m}experts.{e}.gate_proj.weight", inter), (f"{m}experts.{e}.up_proj.weight", inter)], w13[e])
                named(f"{m}experts.{e}.down_proj.weight", w2[e])
            mlp = MLPWeights(w13, w2, router=named(f"{m}gate.weight", empty(experts, hidden, dt=torch.float32)),
                             expert_bias=named(f"{m}gate.e_score_correction_bias", empty(experts, dt=torch.float32)))
        else:
            inter = cfg.intermediate_size
            mlp = MLPWeights(rows([(f"{m}gate_proj.weight", inter), (f"{m}up_proj.weight", inter)],
                                  empty(2 * inter, hidden)),
                             named(f"{m}down_proj.weight", empty(hidden, inter)))
        post = "pre_mlp_layernorm" if mtp else "post_attention_layernorm"
        return BlockWeights(named(f"{prefix}input_layernorm.weight", empty(hidden)),
                            named(f"{prefix}{post}.weight", empty(hidden)), attn, mlp, swa, moe)

    layers = [block(f"model.layers.{i}.", cfg.is_swa(i), cfg.is_moe(i), False) for i in range(cfg.num_hidden_layers)]
    mtp = []
    for k in range(cfg.num_nextn_predict_layers):
        p = f"model.mtp.layers.{k}."
        mtp.append(MTPWeights(named(f"{p}enorm.weight", empty(hidden)), named(f"{p}hnorm.weight", empty(hidden)),
                              named(f"{p}eh_proj.weight", empty(hidden, 2 * hidden)),
                              named(f"{p}final_layernorm.weight", empty(hidden)),
                              block(p, swa=True, moe=False, mtp=True)))
    weights = Weights(named("model.embed_tokens.weight", empty(cfg.vocab_size, hidden)),
                      named("model.norm.weight", empty(hidden)),
                      named("lm_head.weight", empty(cfg.vocab_size, hidden)), layers, mtp, views)
    expected = set(hf_names(cfg))
    if set(views) != expected:  # one naming: hf_mapping's list is the contract
        raise AssertionError(f"rollout weights disagree with hf_mapping: {sorted(set(views) ^ expected)[:10]}")
    return weights


def check(weights: Weights, named_tensors: dict[str, torch.Tensor], *, complete: bool) -> None:
    """Raise one WeightNameError listing every unknown name, wrong shape or non-tensor (and,
    with complete=True, every missing name) before anything is written."""
    problems = []
    unknown = sorted(n for n in named_tensors if n not in weights.views)
    if unknown:
        hint = QUANTISED_HINT if any(n.endswith(QUANT_SUFFIXES) for n in unknown) else ""
        problems.append(f"{len(unknown)} unknown name(s): {_short(unknown)}{hint}")
    bad = []
    for name, t in named_tensors.items():
        if name in weights.views:
            if not isinstance(t, torch.Tensor):
                bad.append(f"{name}: not a tensor ({type(t).__name__})")
            elif tuple(t.shape) != tuple(weights.views[name].shape):
                bad.append(f"{name}: shape {tuple(t.shape)}, expected {tuple(weights.views[name].shape)}")
            elif t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
                bad.append(f"{name}: dtype {t.dtype} is not a real number type")
    if bad:
        problems.append(f"{len(bad)} bad tensor(s): {_short(bad)}")
    if complete:
        missing = sorted(set(weights.views) - set(named_tensors))
        if missing:
            problems.append(f"{len(missing)} missing name(s): {_short(missing)}")
    if problems:
        raise WeightNameError("weights rejected, nothing was changed: " + "; ".join(problems))


def load(weights: Weights, named_tensors: dict[str, torch.Tensor], *, complete: bool = False) -> None:
    """Check, then copy every tensor into place (cast to the engine's dtype and device)."""
    check(weights, named_tensors, complete=complete)
    with torch.no_grad():
        for name, t in named_tensors.items():
            weights.views[name].copy_(t)


def _short(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f" ... and {len(items) - limit} more" if len(items) > limit else "")

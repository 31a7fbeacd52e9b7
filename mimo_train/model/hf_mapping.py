"""The one mapping between our megatron-core parameter names and the HF serving names.

Export, import, `load_hf` and trainer -> rollout weight sync all go through `to_hf` /
`from_hf`. Both work on full (unsharded) tensors as a one-rank model holds them.

Serving names (docs/export.md, "Serving names"), per main layer i under `model.layers.{i}.` and per MTP
layer k under `model.mtp.layers.{k}.`:
  self_attn.{q,k,v,o}_proj.weight, self_attn.attention_sink_bias (SWA), input_layernorm,
  post_attention_layernorm (main) / pre_mlp_layernorm (MTP), mlp.{gate,up,down}_proj (dense),
  mlp.gate.weight, mlp.gate.e_score_correction_bias, mlp.experts.{e}.{gate,up,down}_proj (MoE),
  MTP only: enorm, hnorm, eh_proj, final_layernorm.
megatron fuses gate and up into one `linear_fc1` ([gate; up] along the output dim, the order
its SwiGLU splits in).
"""

from __future__ import annotations

import torch

from mimo_train.model.config import ModelConfig

_ATTN = {"linear_q": "q_proj", "linear_k": "k_proj", "linear_v": "v_proj", "linear_proj": "o_proj"}


def _block_pairs(ours: str, hf: str, cfg: ModelConfig, *, swa: bool, moe: bool, mtp: bool):
    """(our name, hf name or (gate, up) pair) for one transformer block."""
    yield f"{ours}input_layernorm.weight", f"{hf}input_layernorm.weight"
    post = "pre_mlp_layernorm" if mtp else "post_attention_layernorm"
    yield f"{ours}pre_mlp_layernorm.weight", f"{hf}{post}.weight"
    for a, b in _ATTN.items():
        yield f"{ours}self_attention.{a}.weight", f"{hf}self_attn.{b}.weight"
    if cfg.attention_dims(swa)["sinks"]:
        yield f"{ours}self_attention.sinks", f"{hf}self_attn.attention_sink_bias"
    if moe:
        yield f"{ours}mlp.router.weight", f"{hf}mlp.gate.weight"
        yield f"{ours}mlp.router.expert_bias", f"{hf}mlp.gate.e_score_correction_bias"
        for e in range(cfg.n_routed_experts):
            o, h = f"{ours}mlp.experts.local_experts.{e}.", f"{hf}mlp.experts.{e}."
            yield f"{o}linear_fc1.weight", (f"{h}gate_proj.weight", f"{h}up_proj.weight")
            yield f"{o}linear_fc2.weight", f"{h}down_proj.weight"
    else:
        yield f"{ours}mlp.linear_fc1.weight", (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight")
        yield f"{ours}mlp.linear_fc2.weight", f"{hf}mlp.down_proj.weight"


def name_pairs(cfg: ModelConfig, *, mtp: bool = True) -> list[tuple[str, str | tuple[str, str]]]:
    """Every parameter of the model as (our name, serving name or (gate, up) names)."""
    pairs = [("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
             ("decoder.final_layernorm.weight", "model.norm.weight"),
             ("output_layer.weight", "lm_head.weight")]
    for i in range(cfg.num_hidden_layers):
        pairs += _block_pairs(f"decoder.layers.{i}.", f"model.layers.{i}.", cfg,
                              swa=cfg.is_swa(i), moe=cfg.is_moe(i), mtp=False)
    for k in range(cfg.num_nextn_predict_layers if mtp else 0):
        o, h = f"mtp.layers.{k}.", f"model.mtp.layers.{k}."
        pairs += [(f"{o}{n}.weight", f"{h}{n}.weight") for n in ("enorm", "hnorm", "eh_proj", "final_layernorm")]
        pairs += _block_pairs(f"{o}transformer_layer.", h, cfg, swa=True, moe=False, mtp=True)
    return pairs


def hf_names(cfg: ModelConfig, *, mtp: bool = True) -> list[str]:
    """The serving checkpoint's key set."""
    names = []
    for _, hf in name_pairs(cfg, mtp=mtp):
        names += list(hf) if isinstance(hf, tuple) else [hf]
    return names


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, *, mtp: bool = True) -> dict[str, torch.Tensor]:
    """Our full state dict -> serving names. Extra entries (megatron's `_extra_state`, the
    router's token counters) are not weights and are left out."""
    out = {}
    for ours, hf in name_pairs(cfg, mtp=mtp):
        if ours not in state:
            raise KeyError(f"our state dict has no {ours!r}: is it from a model with this config?")
        t = state[ours]
        if isinstance(hf, tuple):
            gate, up = torch.chunk(t, 2, dim=0)
            out[hf[0]], out[hf[1]] = gate, up
        else:
            out[hf] = t
    return out


class WeightNameError(ValueError):
    pass


# Tensor names of quantised checkpoints (block FP8, GPTQ/AWQ, compressed-tensors): when they
# are what does not match, the error says which quantisation is read and what to do.
QUANT_SUFFIXES = ("_scale_inv", "weight_scale", "input_scale", ".qweight", ".qzeros", ".scales", ".g_idx")
QUANTISED_HINT = (" (quantisation tensors: the loaders dequantise only block FP8, e4m3 weights with their "
                  "weight_scale_inv and a quantization_config in config.json, as tools/export.py --fp8 writes; "
                  "dequantise other formats to bf16 first)")


def from_hf(weights: dict[str, torch.Tensor], cfg: ModelConfig, *, mtp: bool = True) -> dict[str, torch.Tensor]:
    """Serving names -> our names. Unknown or missing names raise one error listing them."""
    pairs = name_pairs(cfg, mtp=mtp)
    expected = set(hf_names(cfg, mtp=mtp))
    # Without MTP, a checkpoint's MTP layers are left out on purpose, as transformers does.
    unknown = sorted(k for k in weights if k not in expected and (mtp or not k.startswith("model.mtp.")))
    missing = sorted(expected - set(weights))
    if unknown or missing:
        raise WeightNameError(
            "checkpoint does not match the config: "
            + (f"{len(missing)} missing weight(s): {_shortlist(missing)}" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"{len(unknown)} unknown weight(s): {_shortlist(unknown)}" if unknown else "")
            + (QUANTISED_HINT if any(k.endswith(QUANT_SUFFIXES) for k in unknown) else ""))
    out = {}
    for ours, hf in pairs:
        out[ours] = torch.cat([weights[hf[0]], weights[hf[1]]], dim=0) if isinstance(hf, tuple) else weights[hf]
    return out


def _shortlist(names: list[str], limit: int = 20) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more

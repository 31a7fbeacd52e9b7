"""Names and shapes on the three sides of a conversion.

- *ours*: the parameter names of a one-rank megatron model (`hf_mapping.name_pairs`).
- *dist*: the keys of a training checkpoint (megatron `dist_checkpointing`). They are ours,
  except that the experts of a MoE layer are one stacked tensor with the global expert index
  as a leading axis: `...mlp.experts.local_experts.{e}.linear_fc1.weight` is element `e` of
  `...mlp.experts.experts.linear_fc1.weight` (megatron's SequentialMLP sharding).
- *hf*: the serving names (`hf_mapping`).

Shapes are computed from the config alone, so a checkpoint can be checked against its config
before a single tensor is read, and without building a model (a 309B model does not fit in one
process).
"""

from __future__ import annotations

import re

import torch

from mimo_train.model.config import ModelConfig
from mimo_train.model.hf_mapping import name_pairs

_LOCAL_EXPERT = re.compile(r"^(.*\.mlp\.experts\.)local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_STACKED_EXPERT = re.compile(r"^(.*\.mlp\.experts\.)experts\.(linear_fc[12]\.weight)$")


class ConvertError(ValueError):
    """Input that cannot be converted; raised before anything is written."""


def dist_key(ours: str) -> tuple[str, int | None]:
    """Our name -> (checkpoint key, index along the stacked expert axis or None)."""
    m = _LOCAL_EXPERT.match(ours)
    if m:
        return f"{m.group(1)}experts.{m.group(3)}", int(m.group(2))
    return ours, None


def ours_name(key: str, index: int | None) -> str:
    """The inverse of `dist_key`."""
    m = _STACKED_EXPERT.match(key)
    if m:
        if index is None:
            raise ConvertError(f"{key} is a stacked expert tensor: an expert index is needed")
        return f"{m.group(1)}local_experts.{index}.{m.group(2)}"
    if index is not None:
        raise ConvertError(f"{key} is not a stacked expert tensor, but index {index} was asked for")
    return key


def _block_shapes(cfg: ModelConfig, *, swa: bool, moe: bool) -> dict[str, tuple[int, ...]]:
    d = cfg.attention_dims(swa)
    h, heads, kv = cfg.hidden_size, d["num_heads"], d["num_kv_heads"]
    shapes = {
        "input_layernorm.weight": (h,),
        "pre_mlp_layernorm.weight": (h,),
        "self_attention.linear_q.weight": (heads * d["head_dim"], h),
        "self_attention.linear_k.weight": (kv * d["head_dim"], h),
        "self_attention.linear_v.weight": (kv * d["v_head_dim"], h),
        "self_attention.linear_proj.weight": (h, heads * d["v_head_dim"]),
    }
    if d["sinks"]:
        shapes["self_attention.sinks"] = (heads,)
    if moe:
        e, i = cfg.n_routed_experts, cfg.moe_intermediate_size
        shapes.update({"mlp.router.weight": (e, h), "mlp.router.expert_bias": (e,)})
        for x in range(e):
            shapes[f"mlp.experts.local_experts.{x}.linear_fc1.weight"] = (2 * i, h)  # [gate; up]
            shapes[f"mlp.experts.local_experts.{x}.linear_fc2.weight"] = (h, i)
    else:
        i = cfg.intermediate_size
        shapes.update({"mlp.linear_fc1.weight": (2 * i, h), "mlp.linear_fc2.weight": (h, i)})
    return shapes


def our_shapes(cfg: ModelConfig, *, mtp: bool = True) -> dict[str, tuple[int, ...]]:
    """Every parameter of a one-rank model, as ours name -> full shape."""
    h, v = cfg.hidden_size, cfg.vocab_size
    shapes = {"embedding.word_embeddings.weight": (v, h), "decoder.final_layernorm.weight": (h,),
              "output_layer.weight": (v, h)}
    for i in range(cfg.num_hidden_layers):
        for n, s in _block_shapes(cfg, swa=cfg.is_swa(i), moe=cfg.is_moe(i)).items():
            shapes[f"decoder.layers.{i}.{n}"] = s
    for k in range(cfg.num_nextn_predict_layers if mtp else 0):
        p = f"mtp.layers.{k}."
        shapes.update({f"{p}enorm.weight": (h,), f"{p}hnorm.weight": (h,), f"{p}final_layernorm.weight": (h,),
                       f"{p}eh_proj.weight": (h, 2 * h)})
        for n, s in _block_shapes(cfg, swa=True, moe=False).items():
            shapes[f"{p}transformer_layer.{n}"] = s
    missing = {o for o, _ in name_pairs(cfg, mtp=mtp)} ^ set(shapes)
    if missing:  # hf_mapping and this file must describe the same model
        raise AssertionError(f"names.py and hf_mapping disagree on {sorted(missing)[:5]}")
    return shapes


def dist_shapes(cfg: ModelConfig, *, mtp: bool = True) -> dict[str, tuple[int, ...]]:
    """The checkpoint keys a model with this config saves, with their global shapes."""
    out: dict[str, tuple[int, ...]] = {}
    for ours, shape in our_shapes(cfg, mtp=mtp).items():
        key, index = dist_key(ours)
        out[key] = shape if index is None else (cfg.n_routed_experts, *shape)
    return out


def hf_shapes(cfg: ModelConfig, *, mtp: bool = True) -> dict[str, tuple[int, ...]]:
    """The serving checkpoint's tensors (unquantised), name -> shape."""
    ours = our_shapes(cfg, mtp=mtp)
    out = {}
    for o, hf in name_pairs(cfg, mtp=mtp):
        if isinstance(hf, tuple):  # fused [gate; up] -> two halves
            half = (ours[o][0] // 2, *ours[o][1:])
            out[hf[0]], out[hf[1]] = half, half
        else:
            out[hf] = ours[o]
    return out


def fp8_eligible(hf_name: str, shape: tuple[int, ...]) -> bool:
    """Whether `--fp8` quantises this tensor. As in the FP8 release (and DeepSeek-V3's), the
    projection matrices of the blocks are FP8; embeddings, lm_head, norms, the router, its bias
    and the sinks stay in high precision (they are small, and the router's choice and the
    embedding lookup are sensitive to rounding). `mlp.gate.weight` (the router) does not end
    in `_proj.weight`, so it is not caught."""
    return hf_name.endswith("_proj.weight") and len(shape) == 2


def shortlist(names, limit: int = 12) -> str:
    names = list(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(str(n) for n in names[:limit]) + more


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

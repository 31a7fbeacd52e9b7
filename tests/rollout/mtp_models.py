"""A head-32 tiny model (vLLM's CPU attention size) with random weights under serving names,
whose MTP layers draft something the main model sometimes says: drafts are accepted now and
then at every depth, so acceptance per depth shows which layers drafted."""

from __future__ import annotations

import torch

from mimo_train.convert.names import hf_shapes
from mimo_train.model.config import ModelConfig


def mtp_model(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in hf_shapes(cfg, mtp=True).items():
        if "norm" in name:
            weights[name] = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("attention_sink_bias"):
            weights[name] = torch.randn(shape, generator=gen)
        elif name.endswith("e_score_correction_bias"):
            weights[name] = 0.1 * torch.randn(shape, generator=gen)
        else:
            weights[name] = 0.3 * torch.randn(shape, generator=gen) / shape[-1] ** 0.5 * 3
    hidden = cfg.hidden_size
    for k in range(cfg.num_nextn_predict_layers):
        # eh_proj ~ [0, I]: each MTP layer passes its hidden input on, plus its own small block.
        layer = f"model.mtp.layers.{k}."
        weights[f"{layer}eh_proj.weight"] = torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], 1) \
            + 0.05 * torch.randn(hidden, 2 * hidden, generator=gen)
        for name in ("hnorm.weight", "final_layernorm.weight"):
            weights[f"{layer}{name}"] = torch.ones(hidden)
    return weights

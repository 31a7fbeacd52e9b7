"""Parameter counts of a config, from the model megatron-core builds on the meta device."""

from __future__ import annotations

import dataclasses

from mimo_train.model import compat
from mimo_train.model.config import ModelConfig


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """`total` (main model, embedding and head included), `active_per_token` (every non-expert
    weight plus top-k of the routed experts) and `mtp` (the MTP layers; they share the
    embedding and head, so those are not counted again)."""
    from mimo_train.model.gpt import build_model
    from mimo_train.model.spec import MegatronOptions, transformer_config

    with compat.placement("meta"):
        config = dataclasses.replace(transformer_config(cfg, MegatronOptions()), use_cpu_initialization=False,
                                     perform_initialization=False)
        model = build_model(cfg, config=config)
    total = active = mtp = 0
    share = cfg.num_experts_per_tok / cfg.n_routed_experts
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("mtp."):
            mtp += n
            continue
        total += n
        active += n * share if ".experts." in name else n
    return {"total": total, "active_per_token": round(active), "mtp": mtp}

"""Per-expert load and router entropy of every MoE layer, for one training step.

Each router is observed through hooks (its forward output gives the chosen experts; its
`gating` gives the logits), counted over this rank's tokens, and summed over all ranks at
the end of the step: data-, sequence- and pipeline-parallel ranks each route different tokens
(or hold different layers), so a plain world sum is the global count.

`moe/load_imbalance` is max/mean tokens per expert (1.0 = perfectly balanced), the quantity
the aux-loss-free expert bias drives down; `moe/router_entropy` is the entropy of the
normalised sigmoid scores, averaged over tokens (log E = undecided, 0 = one expert).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import TopKRouter

from mimo_train.model.config import ModelConfig


class RouterStats:
    def __init__(self, model_chunks, cfg: ModelConfig):
        self.experts = cfg.n_routed_experts
        self.num_layers = cfg.num_hidden_layers
        self.moe_layers = [i for i in range(self.num_layers) if cfg.is_moe(i)]
        self.reset()
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    self._observe(module)

    def reset(self) -> None:
        self.load = torch.zeros(self.num_layers, self.experts, dtype=torch.float64)
        self.entropy = torch.zeros(self.num_layers, dtype=torch.float64)
        self.tokens = torch.zeros(self.num_layers, dtype=torch.float64)

    def _observe(self, router: TopKRouter) -> None:
        gating = router.gating

        def gating_and_entropy(input):
            logits = gating(input)
            with torch.no_grad():
                scores = torch.sigmoid(logits.detach().float())
                p = scores / scores.sum(-1, keepdim=True)
                layer = router.layer_number - 1
                self.entropy[layer] += -(p * torch.log(p.clamp(min=1e-30))).sum().double()
                self.tokens[layer] += p.shape[0]
            return logits

        def count(module, inputs, outputs):
            _, routing_map = outputs
            self.load[module.layer_number - 1] += routing_map.detach().sum(0).double()

        router.gating = gating_and_entropy
        router.register_forward_hook(count)

    def metrics(self) -> dict:
        if not self.moe_layers:
            return {}
        packed = torch.cat([self.load.flatten(), self.entropy, self.tokens])
        dist.all_reduce(packed)
        n = self.num_layers * self.experts
        load = packed[:n].view(self.num_layers, self.experts)[self.moe_layers]
        entropy = packed[n:n + self.num_layers][self.moe_layers]
        tokens = packed[n + self.num_layers:][self.moe_layers].clamp(min=1)
        share = load / load.sum(-1, keepdim=True).clamp(min=1)
        imbalance = load.max(-1).values / load.mean(-1).clamp(min=1e-9)
        return {
            "moe/load_imbalance": float(imbalance.max()),
            "moe/router_entropy": float((entropy / tokens).mean()),
            "moe/router_entropy_max": math.log(self.experts),
            # per MoE layer, the share of routed tokens each expert got (JSONL only)
            "moe/expert_load": {f"layer_{layer}": [round(float(x), 4) for x in row]
                                for layer, row in zip(self.moe_layers, share)},
        }

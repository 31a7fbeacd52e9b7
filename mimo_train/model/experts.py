"""The routed experts of one rank, run as two grouped matmuls instead of a loop over experts.

megatron-core's `SequentialMLP` (its experts without Transformer Engine or the grouped_gemm
package) calls each local expert's MLP in turn: per expert, per micro-batch, two linear layers
forward and four matmuls backward, each through megatron's linear autograd function. On the
small models we train on CPU an expert sees ~64 tokens, so the step is dominated by that loop's
per-call overhead, not by the arithmetic (issue 22's profile: 3,192 `aten::mm` calls a step).

`GroupedExperts` keeps SequentialMLP's modules and parameters exactly (one MLP per local expert:
the names checkpoints, the export mapping, EP sharding and the optimizer see do not change) and
replaces only its forward: the local experts' fc1 and fc2 weights are stacked ([E, 2F, H],
[E, H, F]) and the dispatcher's expert-sorted tokens go through `torch._grouped_mm` with the
experts' token offsets, then megatron's own GLU and probability scaling, in its order. On
these shapes the grouped matmul computes each expert's rows with the same kernel as the loop
(forward and gradients are bit-equal in fp32, tests/model/test_grouped_experts.py).

Why the per-expert linear layers may be bypassed: an expert's linear layers never communicate.
With expert tensor or expert parallelism megatron marks them `explicit_expert_comm` (the token
dispatcher does the all-to-all / all-gather), and with neither their TP group has one rank. So
each is a plain matmul with its local weight shard, which is what the grouped call computes.

The loop stays where grouping does not apply: FP8/FP4 (padding per expert), biases on the
expert linears, probabilities applied on the input, or a CUDA tensor in a dtype other than bf16
(CUDA's grouped GEMM kernels are bf16 ones).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.transformer.moe.experts import SequentialMLP


def grouped_linear(tokens: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `tokens` [T, in], sorted by expert, times each expert's weight [E, out, in]
    transposed; `offsets` [E] int32: the cumulative token counts (expert e owns rows
    offsets[e-1]:offsets[e])."""
    return torch._grouped_mm(tokens, weights.transpose(-2, -1), offs=offsets)


class _Stack(torch.autograd.Function):
    """torch.stack(weights) whose copy may be one made earlier (`stacked`, when the weights have
    not changed since); the backward hands each weight its slice of the gradient, as stack's."""

    @staticmethod
    def forward(ctx, stacked, *weights):
        return torch.stack(weights) if stacked is None else stacked.view_as(stacked)

    @staticmethod
    def backward(ctx, grad):
        return (None, *grad.unbind(0))


@contextlib.contextmanager
def stacked_weights_reused(modules):
    """Within this block the experts' weights do not change (one step's micro-batches: the
    optimizer steps after it), so each GroupedExperts stacks its weights once, not once per
    micro-batch (a step of 4 micro-batches makes one copy of them instead of 4)."""
    experts = [m for module in modules for m in module.modules() if isinstance(m, GroupedExperts)]
    for e in experts:
        e._stacks = {}
    try:
        yield
    finally:
        for e in experts:
            e._stacks = None


class GroupedExperts(SequentialMLP):
    _stacks: dict | None = None  # set within stacked_weights_reused: the stacked weights by name

    def _stacked(self, name: str, weights: list[torch.Tensor]) -> torch.Tensor:
        if self._stacks is None:
            return torch.stack(weights)
        stacked = _Stack.apply(self._stacks.get(name), *weights)
        self._stacks[name] = stacked.detach()
        return stacked

    def _groupable(self, hidden: torch.Tensor) -> bool:
        config = self.config
        if config.fp8 or config.fp4 or config.add_bias_linear or config.moe_apply_probs_on_input:
            return False
        if not config.gated_linear_unit or config.activation_func_clamp_value is not None:
            return False  # the GLU below is megatron's default one only
        return hidden.device.type == "cpu" or hidden.dtype == torch.bfloat16

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        tokens = permuted_local_hidden_states
        if self.num_local_experts == 1 or not self._groupable(tokens):
            return super().forward(tokens, tokens_per_expert, permuted_probs)
        fc1 = self._stacked("fc1", [expert.linear_fc1.weight for expert in self.local_experts])  # [E, 2F, H]
        fc2 = self._stacked("fc2", [expert.linear_fc2.weight for expert in self.local_experts])  # [E, H, F]
        offsets = torch.cumsum(tokens_per_expert.to(tokens.device), 0, dtype=torch.int32)
        gate, up = torch.chunk(grouped_linear(tokens, fc1, offsets), 2, dim=-1)
        # megatron's MLP: GLU (x_glu, x_linear + glu_linear_offset), then the router's probability
        # per token, cast back to the activation dtype, then fc2.
        hidden = self.config.activation_func(gate) * (up + self.config.glu_linear_offset)
        hidden = (hidden * permuted_probs.unsqueeze(-1)).to(hidden.dtype)
        return grouped_linear(hidden, fc2, offsets), None


__all__ = ["GroupedExperts", "grouped_linear", "stacked_weights_reused"]

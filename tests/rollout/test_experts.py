"""The two ways the engine runs routed experts give one result (the greedy parity tests cover
whichever a step picks; this pins the other too)."""

import torch

from mimo_train.rollout.model import experts_forward, swiglu


def test_gather_and_grouped_paths_equal_a_per_token_loop():
    gen = torch.Generator().manual_seed(0)
    n, hidden, inter, num_experts, k = 5, 16, 8, 6, 3
    x = torch.randn(n, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen)
    w2 = torch.randn(num_experts, hidden, inter, generator=gen)
    experts = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(n)])
    weights = torch.rand(n, k, generator=gen)
    expected = torch.stack([sum(weights[t, j] * swiglu(x[t], w13[experts[t, j]], w2[experts[t, j]]) for j in range(k))
                            for t in range(n)])
    for path in ("gather", "grouped"):
        torch.testing.assert_close(experts_forward(x, weights, experts, w13, w2, path), expected, rtol=1e-5, atol=1e-5)

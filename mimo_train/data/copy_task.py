"""The copy task: random tokens followed by the same tokens again (the demo's and tests' data)."""

from __future__ import annotations

import torch


def copy_batch(vocab: int, batch: int, half: int, gen: torch.Generator, *, loss_on_copy_only: bool = False):
    """ids, next-token labels and a loss mask, each [batch, 2 * half]. Tokens are drawn from
    [3, vocab) so the special ids 0-2 never appear. The last position has no target; with
    `loss_on_copy_only` only the targets inside the (predictable) copy count."""
    first = torch.randint(3, vocab, (batch, half), generator=gen)
    ids = torch.cat([first, first], dim=1)
    labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    mask = torch.zeros_like(ids, dtype=torch.float32)
    mask[:, (half - 1 if loss_on_copy_only else 0):-1] = 1.0
    return ids, labels, mask

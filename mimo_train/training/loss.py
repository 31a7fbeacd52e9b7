"""The pretraining / SFT objective: main LM loss + weighted mean of the MTP depth losses.

MiMo-V2-Flash (like DeepSeek-V3) trains the MTP layers with the mean cross-entropy over
depths, added to the main loss with a weight from config.
"""

from __future__ import annotations

import torch

from mimo_train.model.gpt import MiMoOutput


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values.float() * mask).sum() / mask.sum().clamp(min=1)


def lm_loss(out: MiMoOutput, mtp_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts: `loss/main`, `loss/mtp_{k}`, `acc/main`, `acc/mtp_{k}` (k from 1)."""
    if not out.losses:
        raise ValueError("the model output has no losses: call the model with labels")
    per_depth = [masked_mean(loss, mask) for loss, mask in zip(out.losses, out.loss_masks)]
    total = per_depth[0]
    if len(per_depth) > 1:
        total = total + mtp_weight * torch.stack(per_depth[1:]).mean()
    metrics = {"loss/total": total.item()}
    for depth, (loss, hit, mask) in enumerate(zip(per_depth, out.correct, out.loss_masks)):
        name = "main" if depth == 0 else f"mtp_{depth}"
        metrics[f"loss/{name}"] = loss.item()
        metrics[f"acc/{name}"] = masked_mean(hit, mask).item()
    return total, metrics

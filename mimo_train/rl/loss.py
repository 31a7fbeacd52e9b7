"""The math of the RL objectives (GRPO and MOPD), in plain torch and free of parallelism.

Token tensors are [B, T] (or one flattened [T]); `mask` is 1 on response tokens. Metrics are
detached float64 SUMS so the caller can all-reduce them over data-parallel ranks, then divide.
"""

from __future__ import annotations

import torch

KINDS = ("grpo", "mopd")


def _f(x: torch.Tensor) -> torch.Tensor:
    # At least float32: in bf16 a ratio near 1 has a resolution of 1/128, too coarse for the
    # IS bounds and the PPO clip. float64 stays float64 (tests use it for exact values).
    return x.to(torch.promote_types(x.dtype, torch.float32))


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO: each reward against its group (the consecutive samples of one prompt)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_groups*group_size], got {tuple(rewards.shape)}")
    if group_size <= 0 or rewards.numel() % group_size:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of group_size={group_size}"
        )
    r = _f(rewards).view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    # A group with one reward teaches nothing; the mean can round off r, so force exact 0.
    same = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True))
    return torch.where(same, torch.zeros_like(adv), adv).view(-1)


def distill_advantages(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor
) -> torch.Tensor:
    """MOPD dense advantage: per-token reverse-KL signal log pi_teacher - log pi_student."""
    return (_f(teacher_logprobs) - _f(student_logprobs)).detach()


def token_advantages(
    mask: torch.Tensor, *, distill: torch.Tensor | None, outcome: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """A_t = distill_t + alpha * outcome_b on response tokens, 0 elsewhere."""
    if distill is None and outcome is None:
        raise ValueError("token_advantages needs distill and/or outcome advantages, got neither")
    adv = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if distill is not None:
        _same_shape(mask, distill=distill)
        adv = adv + _f(distill).detach()
    if outcome is not None:
        if outcome.shape != mask.shape[:-1]:
            raise ValueError(
                f"outcome must be per sequence {tuple(mask.shape[:-1])}, got {tuple(outcome.shape)}"
            )
        adv = adv + alpha * _f(outcome).detach().unsqueeze(-1)
    # where, not *: padded positions may hold -inf teacher log-probs, and inf * 0 = NaN.
    return torch.where(mask.bool(), adv, torch.zeros_like(adv))


def is_weights(
    train_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
    eps_low: float, eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train/inference mismatch correction (report Eq. 8): keep pi/mu inside [eps_low, eps_high].

    Tokens outside are dropped (weight 0), not clipped: a token the engine sampled with a very
    different probability than the trainer computes is not evidence about the policy.
    """
    m = mask.bool()
    diff = torch.where(m, _f(train_logprobs) - _f(rollout_logprobs), 0.0).detach()
    ratio = torch.exp(diff)
    kept = m & (ratio >= eps_low) & (ratio <= eps_high)
    return torch.where(kept, ratio, torch.zeros_like(ratio)), kept


def sequence_token_weights(mask: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """1/(|y_i| * num_sequences) per response token: mean over each sequence, then the batch."""
    if num_sequences <= 0:
        raise ValueError(f"num_sequences must be positive, got {num_sequences}")
    m = _f(mask)
    lengths = m.sum(dim=-1, keepdim=True).clamp(min=1)  # empty rows: 0 / 1, not 0 / 0
    return m / (lengths * num_sequences)


def _same_shape(mask: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    # Refuse broadcasting: a [B] advantage against [B, T] log-probs would silently be wrong.
    for name, t in tensors.items():
        if t is not None and t.shape != mask.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {tuple(mask.shape)} like mask"
            )


def policy_loss(
    logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, advantages: torch.Tensor,
    mask: torch.Tensor, token_weight: torch.Tensor, *, kind: str,
    clip_low: float = 0.2, clip_high: float = 0.2, eps_low: float = 0.5, eps_high: float = 2.0,
    ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = sum_t token_weight * per_token_loss over response tokens, and metric sums."""
    if kind not in KINDS:
        raise ValueError(f"unknown policy loss kind {kind!r}; valid: {', '.join(KINDS)}")
    _same_shape(mask, rollout_logprobs=rollout_logprobs, advantages=advantages,
                token_weight=token_weight, ref_logprobs=ref_logprobs, logprobs=logprobs)
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    if kl_coef > 0 and kind == "mopd":
        raise ValueError(
            "kl_coef is a GRPO option; MOPD's advantage already is a KL to the teacher"
        )
    m = mask.bool()
    zero = lambda x: torch.where(m, _f(x), 0.0)  # noqa: E731
    # Zero padded positions first: garbage there (-inf) would give exp overflow, and inf * 0
    # = NaN in the backward pass even though those tokens are masked out of the loss.
    lp, old, adv = zero(logprobs), zero(rollout_logprobs).detach(), zero(advantages).detach()
    weights, kept = is_weights(lp, old, mask, eps_low, eps_high)
    ratio = torch.exp(lp - old)
    clipped = torch.zeros((), dtype=torch.float64, device=lp.device)
    if kind == "grpo":
        surr = ratio * adv
        surr_clip = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
        per_token = -torch.minimum(surr, surr_clip)
        clipped = (m & (surr_clip < surr)).sum().double()
    else:  # mopd, report Eq. 7: the weight is a constant, the gradient flows through log pi
        per_token = -weights * adv * lp
    kl_sum = torch.zeros((), dtype=torch.float64, device=lp.device)
    if ref_logprobs is not None:
        d = zero(ref_logprobs).detach() - lp
        k3 = torch.exp(d) - d - 1  # Schulman's k3: unbiased for KL(pi||ref), always >= 0
        kl_sum = k3.detach().sum().double()
        if kl_coef > 0:
            per_token = per_token + kl_coef * k3
    loss = (torch.where(m, _f(token_weight).detach() * per_token, 0.0)).sum()
    metrics = {
        "tokens": m.sum().double(),
        "is_masked": (m & ~kept).sum().double(),
        "clipped": clipped,
        "ratio": torch.where(m, ratio, 0.0).detach().sum().double(),
        "advantage": adv.sum().double(),
        "advantage_sq": (adv * adv).sum().double(),
        "kl": kl_sum,
    }
    return loss, metrics

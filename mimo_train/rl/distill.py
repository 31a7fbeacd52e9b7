"""Distribution-level MOPD losses: the student's reverse KL to its teacher at each position.

`rl.distill_loss` picks how the teacher's signal enters the loss (docs/rl.md has the objectives
and their gradients):
  sampled  the report's estimator (rl.loss): advantage log pi_t(y) - log pi_s(y) of the sampled
           token y, a policy-gradient term; unbiased for the KL's gradient, one token's worth of
           information per position.
  full     KL(pi_s || pi_t) = sum_v p_s(v) (log p_s(v) - log p_t(v)) over the whole vocabulary,
           differentiated exactly by autograd; needs the teacher's whole distribution.
  topk     the same terms over the teacher's top-k set S, unrenormalised, as in the MOPD paper:
           sum_{v in S} p_s(v) (log p_s(v) - log p_t(v)) - p_s(v) + p_t(v). Each term is >= 0
           and is 0 only where p_s = p_t; with S the whole vocabulary it is `full` (the added
           terms sum to 1 - 1).
The teacher's top-k, not the student's or the union: a served teacher returns its top-k in the
same call that scores the sampled tokens (prompt_logprobs=k), while the student's top-k would
need a second call per step with ids only the trainer knows; and the teacher's top-k is where
its mass is, which is what a reverse KL must not miss.

Logits may be split over tensor-parallel ranks along the vocabulary ([N, V / tp] per rank, as
megatron's output layer leaves them): log-softmax, gathers and sums are taken across the shards
(forward all-reduce, backward identity), so every rank gets the one-process value. Rows are
processed in chunks of `CHUNK` positions: the temporaries are [CHUNK, V / tp] floats.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

CHUNK = 1024  # positions per chunk: bounds the [positions, V / tp] temporaries


def _tp_sum(x: torch.Tensor, group, *, shared_use: bool = True) -> torch.Tensor:
    """Sum over the TP group. shared_use: every rank computes the same thing from the sum, so
    each addend's gradient is the sum's (backward identity). Otherwise each rank uses the sum
    with its own shard (the log-softmax normaliser), and the gradient of the sum is the total
    over ranks (backward all-reduce)."""
    if group is None or group.size() == 1:
        return x
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        reduce_from_tensor_model_parallel_region)

    if not shared_use:
        x = copy_to_tensor_model_parallel_region(x, group)  # forward identity, backward all-reduce
    return reduce_from_tensor_model_parallel_region(x.contiguous(), group)


def vocab_log_softmax(logits: torch.Tensor, group=None) -> torch.Tensor:
    """log_softmax over a vocabulary split along the last dim over `group`; returns this rank's
    shard [N, V_local] in float32."""
    z = logits.float()
    top = z.detach().amax(-1, keepdim=True)
    if group is not None and group.size() > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    total = _tp_sum(torch.exp(z - top).sum(-1, keepdim=True), group, shared_use=False)
    return z - (top + total.log())


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield slice(start, min(start + CHUNK, n))


def full_kl(logits: torch.Tensor, teacher_logprobs: torch.Tensor, group=None) -> torch.Tensor:
    """KL(p_s || p_t) per position [N]. logits [N, V_local] (this rank's vocab shard);
    teacher_logprobs the teacher's log-probs over the same shard, [N, V_local]."""
    if teacher_logprobs.shape != logits.shape:
        raise ValueError(f"teacher log-probs {tuple(teacher_logprobs.shape)} do not match the logits' "
                         f"{tuple(logits.shape)} (same positions, same vocabulary shard)")
    out = []
    for rows in _chunks(logits.shape[0]):
        ls = vocab_log_softmax(logits[rows], group)
        out.append(_tp_sum((ls.exp() * (ls - teacher_logprobs[rows].float())).sum(-1), group))
    return torch.cat(out) if out else logits.new_zeros(0)


def student_logprobs_at(logits: torch.Tensor, ids: torch.Tensor, group=None, vocab_start: int = 0) -> torch.Tensor:
    """log p_s at token ids [N, k] (global ids) from vocab-sharded logits [N, V_local]."""
    out = []
    v_local = logits.shape[-1]
    for rows in _chunks(logits.shape[0]):
        ls = vocab_log_softmax(logits[rows], group)
        local = ids[rows] - vocab_start
        inside = (local >= 0) & (local < v_local)
        picked = ls.gather(-1, local.clamp(0, v_local - 1))
        out.append(_tp_sum(torch.where(inside, picked, torch.zeros_like(picked)), group))
    return torch.cat(out) if out else logits.new_zeros(0, ids.shape[-1])


def topk_kl(logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, group=None,
            vocab_start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position [N]: sum over the teacher's top-k ids of p_s (log p_s - log p_t) - p_s + p_t,
    and the student's mass on those ids [N] (detached). teacher_ids / teacher_logprobs [N, k]."""
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[0] != logits.shape[0]:
        raise ValueError(f"teacher top-k ids {tuple(teacher_ids.shape)} and log-probs "
                         f"{tuple(teacher_logprobs.shape)} must both be [positions={logits.shape[0]}, k]")
    ls = student_logprobs_at(logits, teacher_ids, group, vocab_start)
    lt = teacher_logprobs.float()
    ps, pt = ls.exp(), lt.exp()
    return (ps * (ls - lt) - ps + pt).sum(-1), ps.detach().sum(-1)


def dense_teacher(ids: torch.Tensor, logprobs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A teacher's whole distribution, given as its top-k with k = the vocabulary (any order),
    as dense log-probs [N, vocab]."""
    if ids.shape[-1] != vocab_size:
        raise ValueError(f"distill_loss=full needs the teacher's log-prob of every token: got {ids.shape[-1]} "
                         f"of {vocab_size} per position")
    seen = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device).scatter_(-1, ids, True)
    if not bool(seen.all()):  # a repeated id would leave another token's entry unwritten
        raise ValueError("distill_loss=full: the teacher's ids at a position are not every token once")
    return torch.empty(ids.shape, dtype=torch.float32, device=ids.device).scatter_(-1, ids, logprobs.float())

"""Rollout samples -> the packed micro-batches the trainer's RL step consumes.

A sample is prompt + response. The training input is every token but the last, the label of
position t is token t+1, and positions that predict a response token carry the loss and
their per-token values (rollout log-prob, teacher log-prob, outcome advantage, token
weight). Each micro-batch packs its samples into one THD row (`cu_seqlens` bounds attention),
padded with a masked segment to one common length, a multiple of the TP size (sequence
parallel splits the row over TP ranks; pipeline stages exchange equal shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimo_train.rl.loss import sequence_token_weights


@dataclass
class Sample:
    prompt: list[int]
    response: list[int]
    rollout_logprobs: list[float]  # the engine's log-prob of each response token
    domain: str = ""
    reward: float = 0.0
    outcome_advantage: float = 0.0  # group-normalised reward (GRPO)
    teacher_logprobs: list[float] | None = None  # MOPD: the domain teacher's, per response token
    ref_logprobs: list[float] | None = None  # GRPO with a KL penalty: the reference's
    # MOPD with rl.distill_loss full / topk: the teacher's k most likely tokens at each response
    # position and their log-probs, [len(response), k] each (k = the vocabulary for full).
    teacher_top_ids: torch.Tensor | None = None
    teacher_top_logprobs: torch.Tensor | None = None
    routed: torch.Tensor | None = None  # [len(prompt) + len(response) - 1, MoE layers, k]

    @property
    def length(self) -> int:  # training positions
        return len(self.prompt) + len(self.response) - 1


PER_TOKEN = ("rollout_logprobs", "teacher_logprobs", "ref_logprobs")


def _sample_tensors(s: Sample, num_sequences: int, domains: list[str] | None = None) -> dict[str, torch.Tensor]:
    seq = torch.tensor(s.prompt + s.response, dtype=torch.long)
    n, start = s.length, len(s.prompt) - 1  # position `start` predicts the first response token
    out = {"tokens": seq[:-1], "labels": seq[1:], "position_ids": torch.arange(n)}
    mask = torch.zeros(n)
    mask[start:] = 1.0
    out["loss_mask"] = mask
    # Per-sequence then per-batch mean: each response token counts 1 / (|y| * sequences).
    out["token_weight"] = sequence_token_weights(mask[None], num_sequences)[0]
    out["outcome"] = mask * s.outcome_advantage
    for name in PER_TOKEN:
        values = getattr(s, name)
        t = torch.zeros(n)
        if values is not None:
            if len(values) != len(s.response):
                raise ValueError(f"{name}: {len(values)} values for a response of {len(s.response)} tokens")
            t[start:] = torch.tensor(values, dtype=torch.float32)
        out[name] = t
    if s.teacher_top_ids is not None:  # [n, k], rows before `start` zero (masked out)
        k = s.teacher_top_ids.shape[-1]
        if s.teacher_top_ids.shape != (len(s.response), k) or s.teacher_top_logprobs.shape != (len(s.response), k):
            raise ValueError(f"teacher top-k of shape {tuple(s.teacher_top_ids.shape)} for a response of "
                             f"{len(s.response)} tokens")
        out["teacher_top_ids"] = torch.zeros(n, k, dtype=torch.long)
        out["teacher_top_ids"][start:] = s.teacher_top_ids
        out["teacher_top_logprobs"] = torch.zeros(n, k)
        out["teacher_top_logprobs"][start:] = s.teacher_top_logprobs
    if domains is not None:  # per-domain metrics: the sample's domain index on its response tokens, else -1
        out["domain"] = torch.where(mask.bool(), domains.index(s.domain), -1)
    if s.routed is not None:
        if s.routed.shape[0] != n:
            raise ValueError(f"routed experts for {s.routed.shape[0]} positions, the sample has {n}")
        out["routed"] = s.routed.long()
    return out


def padded_length(samples: list[Sample], micro_batch: int, multiple: int) -> int:
    """One length for every micro-batch of the step (the longest packed group, rounded up)."""
    longest = max(sum(s.length for s in samples[i:i + micro_batch]) for i in range(0, len(samples), micro_batch))
    return -(-longest // multiple) * multiple


def micro_batches(samples: list[Sample], micro_batch: int, *, num_sequences: int, length: int,
                  pad_id: int = 0, num_experts: int | None = None, domains: list[str] | None = None) -> list[dict]:
    """Pack consecutive groups of `micro_batch` samples, each into a [1, length] row (per-token
    values with a trailing dim, the teacher's top-k, as [1, length, k]). With `domains`, a
    "domain" row holds each response token's index in it (-1 elsewhere)."""
    out = []
    for i in range(0, len(samples), micro_batch):
        parts = [_sample_tensors(s, num_sequences, domains) for s in samples[i:i + micro_batch]]
        lens = [p["tokens"].numel() for p in parts]
        pad = length - sum(lens)
        if pad < 0:
            raise ValueError(f"micro-batch of {sum(lens)} tokens does not fit the padded length {length}")
        mb = {}
        for key in parts[0]:
            if key == "routed":
                continue
            fill = pad_id if key in ("tokens", "labels") else (-1 if key == "domain" else 0)
            padding = torch.full((pad, *parts[0][key].shape[1:]), fill, dtype=parts[0][key].dtype)
            if key == "position_ids":
                padding = torch.arange(pad)
            mb[key] = torch.cat([p[key] for p in parts] + [padding]).unsqueeze(0)
        if "routed" in parts[0]:
            r = parts[0]["routed"]
            # Padding tokens need experts to replay: spread round-robin so that no expert's load
            # (which the aux-loss-free bias reads) is inflated; `routed_valid` marks real tokens.
            experts, k = num_experts or r.shape[-1], r.shape[-1]
            filler = (torch.arange(pad * k) % experts).view(pad, 1, k).expand(pad, r.shape[1], k)
            mb["routed"] = torch.cat([p["routed"] for p in parts] + [filler]).unsqueeze(0)
            mb["routed_valid"] = torch.cat([torch.ones(sum(lens), dtype=torch.bool),
                                            torch.zeros(pad, dtype=torch.bool)]).unsqueeze(0)
        segments = lens + ([pad] if pad else [])
        cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(segments), 0).to(torch.int32)
        mb["cu_seqlens"], mb["max_seqlen"] = cu, max(segments)
        out.append(mb)
    return out

"""What callers hand the engine and get back: sampling params, completions, metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one prompt. Invalid values raise ValueError at construction.

    temperature 0 is greedy. top_k 0 and top_p 1.0 switch those filters off (top-k is applied
    before top-p, both after temperature). Generation stops at max_new_tokens, at a token of
    stop_token_ids (kept in the output), at the model's eos_token_id unless ignore_eos, or at
    the engine's max length. n independent samples are drawn per prompt; with a seed they are
    reproducible whatever else runs in the same batch.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None
    return_routed_experts: bool = False

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"SamplingParams: {msg}")

        real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        need(real(self.temperature) and self.temperature >= 0,
             f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        need(real(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        need(integer(self.top_k) and self.top_k >= 0, f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        need(integer(self.max_new_tokens) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        need(integer(self.n) and self.n >= 1, f"n must be an int >= 1, got {self.n!r}")
        need(self.seed is None or integer(self.seed), f"seed must be an int or None, got {self.seed!r}")
        stops = tuple(self.stop_token_ids)
        need(all(integer(t) and t >= 0 for t in stops), f"stop_token_ids must be ints >= 0, got {stops!r}")
        object.__setattr__(self, "stop_token_ids", stops)


@dataclass
class DraftCounts:
    """Speculative decoding as one sample saw it, counting only tokens it took: a draft accepted
    past its stop token or length limit never reaches it, so it is not counted as accepted."""

    steps: int = 0  # verify steps the sample took part in
    tokens: int = 0  # tokens those steps handed it (its first token comes from the prefill)
    proposed: list[int] = field(default_factory=list)  # [j]: drafts at position j proposed to it
    accepted: list[int] = field(default_factory=list)  # [j]: of those, accepted and taken

    @classmethod
    def zeros(cls, depth: int) -> "DraftCounts":
        return cls(proposed=[0] * depth, accepted=[0] * depth)

    def add_step(self, K: int, kept: int, taken: int) -> None:
        """One verify step: K drafts proposed, the first `kept` accepted and taken, `taken`
        tokens handed over (kept + the corrected or bonus token, fewer at a stop)."""
        self.steps += 1
        self.tokens += taken
        for j in range(K):
            self.proposed[j] += 1
            self.accepted[j] += j < kept

    def minus(self, earlier: "DraftCounts") -> "DraftCounts":
        """What was counted since `earlier` (a copy of this accumulator taken before)."""
        return DraftCounts(self.steps - earlier.steps, self.tokens - earlier.tokens,
                           [a - b for a, b in zip(self.proposed, earlier.proposed)],
                           [a - b for a, b in zip(self.accepted, earlier.accepted)])

    @staticmethod
    def total(counts) -> "DraftCounts":
        out = DraftCounts()
        for c in counts:
            out.steps += c.steps
            out.tokens += c.tokens
            for mine, theirs in ((out.proposed, c.proposed), (out.accepted, c.accepted)):
                mine.extend([0] * (len(theirs) - len(mine)))
                for j, x in enumerate(theirs):
                    mine[j] += x
        return out

    @property
    def accept_length(self) -> float | None:
        """Tokens per verify step, in [1, K+1]; None without verify steps."""
        return self.tokens / self.steps if self.steps else None

    @property
    def acceptance_per_position(self) -> list[float]:
        """P(draft j accepted and taken) for every position j that was drafted."""
        return [a / p for a, p in zip(self.accepted, self.proposed) if p]


@dataclass
class Completion:
    """One sample of one prompt."""

    request_id: int
    prompt_index: int  # position of the prompt in the generate() call (or add_request order)
    sample_index: int  # 0..n-1
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]  # log_softmax(logits / T) of each token under the target (T = 1 if greedy)
    finish_reason: str  # "stop" (a stop or eos token, included in tokens) or "length"
    policy_version: int  # the weights version this sample started with ...
    policy_version_end: int  # ... and ended with (differ only if weights changed mid-sample)
    # [len(prompt) + len(tokens) - 1, num MoE layers, top-k]: the experts chosen for the token
    # at each input position (every prompt token and every generated token but the last).
    routed_experts: torch.Tensor | None = None
    # Its drafting statistics; None where the backend cannot count them per request.
    drafts: DraftCounts | None = None


@dataclass
class Metrics:
    """One generate() call (or a window of step() calls)."""

    tokens: int = 0  # tokens handed to requests
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    steps: int = 0  # decode iterations (one verify forward each)
    row_steps: int = 0  # (request, iteration) pairs verified: the weight of the two rates below
    # Both count only tokens that reach a request (see DraftCounts): tokens a verify step handed
    # to requests per row, in [1, K+1], and P(draft j accepted and taken), j = 0..K-1.
    mean_accept_length: float = 0.0
    acceptance_per_position: list[float] = field(default_factory=list)
    occupancy: float = 0.0  # mean fraction of the engine's slots busy during decode iterations
    depth_steps: dict[int, int] = field(default_factory=dict)  # iterations run at each depth K
    prefill_tokens: int = 0

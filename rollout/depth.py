"""How deep to draft: measured step costs weighed with the drafts' running acceptance.

Deeper drafting pays while a step is bound by reading weights (small batches): verifying K+1
positions costs little more than one. As the batch grows the step becomes compute-bound and
rejected drafts are wasted work, so the best K falls; it also falls when the policy's drafts are
rejected more (a harder domain, a policy that moved away from its MTP layers). `AutoDepth` picks
each step's K as the one with the most expected tokens per second:

    tokens(K) = 1 + a_0 + ... + a_{K-1},   K* = argmax_K tokens(K) / seconds(batch, K)

where a_j = P(draft j accepted and taken) (it already includes drafts 0..j-1 being accepted:
the same quantity as `DraftCounts.acceptance_per_position`) and seconds(batch, K) is one decode
step on this engine (drafting, verifying and the host sync, the interval `Engine.step` times):
timed on synthetic requests at start-up (`measure_step_costs`), then followed by the steps that
actually run. The start-up figure alone is not enough: in a demo run that used only it (2c9429f,
docs/results/demo-2c9429f/speculative.json) auto drafted at K = 2 and ran at 0.81 of K = 0.
"""

from __future__ import annotations

import torch

from mimo_train.rollout.api import SamplingParams


def expected_tokens(acceptance: list[float], depth: int) -> float:
    """Tokens a verify step hands a request at depth K: its own token plus every accepted draft."""
    return 1 + sum(acceptance[:depth])


def measure_step_seconds(engine, batch: int, depth: int, steps: int = 10, prompt_len: int = 16) -> float:
    """Mean seconds of one decode step (drafting, verifying and the host sync, as
    `Engine.step` times it) of `batch` synthetic requests sampled at temperature 1 (as RL
    samples: verifying a sampled draft costs more than a greedy one) at depth K. A mean,
    not a median: below the deepest K the MTP layers catch up every few steps (every 5 at K = 0
    with 3 MTP layers, rollout/decode.py), and that cost is part of the step's."""
    if engine.n or engine.waiting:
        raise RuntimeError("measure step costs on an idle engine")
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, engine.cfg.vocab_size, (batch, prompt_len), generator=gen).tolist()
    saved = engine.fixed_depth
    engine.fixed_depth = depth
    try:
        for p in prompts:
            engine.add_request(p, SamplingParams(temperature=1.0, max_new_tokens=10 ** 6, ignore_eos=True, seed=0))
        engine.step()  # admission and a first step (and compilation, if any)
        engine.step()
        seconds = 0.0
        for _ in range(steps):  # the interval the engine times on every step (Engine.step)
            engine.step()
            seconds += engine.last_decode_seconds
        seconds /= steps
    finally:
        engine.fixed_depth = saved
        engine.abort_all()
    return seconds


def measure_step_costs(engine, steps: int = 10) -> dict[int, list[float]]:
    """{batch: [seconds of one decode step at K = 0..max_depth]} for batches 1, 2, 4, ... and
    the engine's max_batch. Each K is timed twice, in the order 0..Kmax and then Kmax..0, and
    the two means averaged: a machine that slows down or speeds up meanwhile favours no depth."""
    batches = sorted({min(1 << i, engine.config.max_batch) for i in range(engine.config.max_batch.bit_length() + 1)})
    depths = list(range(engine.max_depth + 1))
    costs = {}
    for batch in batches:
        total = [0.0] * len(depths)
        for order in (depths, depths[::-1]):
            for k in order:
                total[k] += measure_step_seconds(engine, batch, k, max(1, steps // 2)) / 2
        costs[batch] = total
    return costs


class AutoDepth:
    """Chooses K for every decode step from step costs (`seconds`: {batch: [s at K=0..Kmax]},
    the smallest measured batch >= the active one applies) and the acceptance of the drafts
    verified lately. With `learn_costs`, each step that runs moves its own batch size's cost at
    its K a fraction `cost_rate` of the way to its time (`observe_cost`); a batch size met for the
    first time starts from the measured costs, interpolated between the measured sizes.

    Acceptance per position is a decayed count: each observed step multiplies that position's
    counts by `1 - 1/memory` before adding its rows, so the estimate follows a policy that
    changes under RL within about `memory` steps. Until a position has been drafted it is
    `prior ** (j + 1)` (a per-draft acceptance `prior`), held with the weight of `prior_rows`
    drafts. Every `explore_every`-th choice runs another K than the best, in turn the deepest,
    then 0, 1, ... (skipping the best): so each K's cost is timed again now and then, and the
    deepest K, every Kmax + 1 explorations, measures the positions a shallow K never proposes
    (their estimates then follow the policy over about `memory` such steps, not `memory` steps)."""

    def __init__(self, seconds: dict[int, list[float]], prior: float = 0.7, memory: int = 64,
                 explore_every: int = 16, prior_rows: float = 1.0, learn_costs: bool = True, cost_rate: float = 0.1):
        if not seconds or len({len(s) for s in seconds.values()}) != 1:
            raise ValueError("AutoDepth needs step costs at K = 0..Kmax for at least one batch size")
        if not 0 <= prior <= 1 or memory < 1 or explore_every < 0:
            raise ValueError(f"AutoDepth: need 0 <= prior <= 1, memory >= 1, explore_every >= 0; got "
                             f"{prior}, {memory}, {explore_every}")
        if not 0 < cost_rate <= 1 or prior_rows <= 0:
            raise ValueError(f"AutoDepth: need 0 < cost_rate <= 1 and prior_rows > 0; got {cost_rate}, {prior_rows}")
        self.measured = {b: list(s) for b, s in sorted(seconds.items())}
        self.seconds: dict[int, list[float]] = {}  # per batch size met: the costs that steps update
        self.learn_costs, self.cost_rate = learn_costs, cost_rate
        self.max_depth = len(next(iter(seconds.values()))) - 1
        self.prior = [prior ** (j + 1) for j in range(self.max_depth)]
        self.prior_rows, self.keep, self.explore_every = prior_rows, 1 - 1 / memory, explore_every
        self.proposed = [0.0] * self.max_depth
        self.accepted = [0.0] * self.max_depth
        self.choices = self.explorations = 0

    def acceptance(self) -> list[float]:
        """The running estimate of P(draft j accepted and taken), j = 0..Kmax-1."""
        w = self.prior_rows
        return [(a + w * p) / (n + w) for a, n, p in zip(self.accepted, self.proposed, self.prior)]

    def costs(self, batch: int) -> list[float]:
        """Step seconds at K = 0..Kmax for this batch size: its own once a step ran at it, else
        interpolated linearly between the measured sizes around it (the nearest beyond them)."""
        if batch in self.seconds:
            return self.seconds[batch]
        sizes = list(self.measured)
        below = max((b for b in sizes if b <= batch), default=sizes[0])
        above = min((b for b in sizes if b >= batch), default=sizes[-1])
        if below == above:
            return list(self.measured[below])
        w = (batch - below) / (above - below)
        return [(1 - w) * lo + w * hi for lo, hi in zip(self.measured[below], self.measured[above])]

    def best(self, batch: int) -> int:
        """The K with the most expected tokens per second at this batch (the shallower on a tie)."""
        costs = self.costs(batch)
        acc = self.acceptance()
        rate = [expected_tokens(acc, k) / costs[k] for k in range(self.max_depth + 1)]
        return max(range(self.max_depth + 1), key=lambda k: (rate[k], -k))

    def choose(self, batch: int) -> int:
        self.choices += 1
        k = self.best(batch)
        if self.max_depth and self.explore_every and self.choices % self.explore_every == 0:
            turn = [self.max_depth, *range(self.max_depth)]
            others = [d for d in turn if d != k]
            self.explorations += 1
            return others[(self.explorations - 1) % len(others)]
        return k

    def observe_cost(self, batch: int, depth: int, seconds: float) -> None:
        """A decode step of `batch` rows at depth K took `seconds`."""
        if self.learn_costs:
            costs = self.seconds.setdefault(batch, self.costs(batch))
            costs[depth] += self.cost_rate * (seconds - costs[depth])

    def observe(self, depth: int, kept: list[int]) -> None:
        """One verify step at depth K: row r's first kept[r] drafts were accepted and taken."""
        for j in range(depth):
            self.proposed[j] = self.proposed[j] * self.keep + len(kept)
            self.accepted[j] = self.accepted[j] * self.keep + sum(k > j for k in kept)

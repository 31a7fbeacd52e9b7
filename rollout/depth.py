"""How deep to draft at each batch size, measured on this machine.

Deeper drafting pays while a step is bound by reading weights (small batches): verifying K+1
positions costs little more than one. As the batch grows the step becomes compute-bound and
rejected drafts are wasted work, so the best K falls. The table below is found by timing one
decode step for every (batch size, K) with synthetic requests, and weighing it with the tokens a
step yields, 1 + a + ... + a^K for a per-draft acceptance rate a (the model's, e.g. from the
metrics of an earlier call; the MiMo report sees 2.8-3.6 tokens per step at K = 3).
"""

from __future__ import annotations

import time

import torch

from mimo_train.rollout.api import SamplingParams


def expected_tokens(depth: int, acceptance: float) -> float:
    """Tokens per verify step when each draft is accepted with probability `acceptance`."""
    return sum(acceptance ** j for j in range(depth + 1))


def measure_step_seconds(engine, batch: int, depth: int, steps: int = 10, prompt_len: int = 16) -> float:
    """Mean seconds of one decode step of `batch` synthetic greedy requests at depth K. A mean,
    not a median: below the deepest K the MTP layers catch up every few steps (every 5 at K = 0
    with 3 MTP layers, rollout/decode.py), and that cost is part of the step's."""
    if engine.n or engine.waiting:
        raise RuntimeError("measure the depth table on an idle engine")
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, engine.cfg.vocab_size, (batch, prompt_len), generator=gen).tolist()
    saved = engine.fixed_depth
    engine.fixed_depth = depth
    try:
        for p in prompts:
            engine.add_request(p, SamplingParams(temperature=0.0, max_new_tokens=10 ** 6, ignore_eos=True))
        engine.step()  # admission and a first step (and compilation, if any)
        engine.step()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        seconds = (time.perf_counter() - start) / steps
    finally:
        engine.fixed_depth = saved
        engine.abort_all()
    return seconds


def measure_depth_table(engine, batch_sizes=(1, 2, 4, 8, 16), acceptance: float = 0.7,
                        steps: int = 10) -> dict[int, int]:
    """{batch size: the K with the most expected tokens per second} for this engine."""
    table = {}
    for batch in sorted(b for b in batch_sizes if b <= engine.config.max_batch):
        rate = {k: expected_tokens(k, acceptance) / measure_step_seconds(engine, batch, k, steps)
                for k in range(engine.max_depth + 1)}
        table[batch] = max(rate, key=rate.get)
    return table

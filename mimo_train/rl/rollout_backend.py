"""The one rollout interface the RL loop talks to, and its in-process implementation.

    backend = make_backend(config, max_len)              # every rank (rank 0 owns the engine / servers)
    backend.push_weights(trainer.model, version)         # every rank: a collective
    completions, metrics = backend.generate(prompts, params)   # rank 0
    backend.close()                                      # every rank

`generate` returns `mimo_train.rollout.Completion`s: token ids, log-probs of the sampled tokens
at the sampling temperature, routed experts (when the backend can report them) and the policy
version each sample was drawn with. `pause` / `resume` bracket weight updates of backends that
serve requests concurrently. Two implementations: `NativeRollout` (our engine, in rank 0's
process: CPU, tests, `make demo`) and `VLLMRollout` (vLLM servers in their own processes,
`mimo_train.rl.vllm_rollout`).
"""

from __future__ import annotations

from typing import Protocol

from mimo_train.parallel.rank0 import on_rank0
from mimo_train.rl.weight_gather import gather_serving_weights
from mimo_train.training.config import RunConfig


class RolloutBackend(Protocol):
    version: int  # the policy version of the weights the next samples are drawn with

    def generate(self, prompts: list[list[int]], params: list) -> tuple[list, object]: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def push_weights(self, model_chunks, version: int, *, draft_only: bool = False) -> dict: ...

    def close(self) -> None: ...


class NativeRollout:
    """Our engine in rank 0's process. Weights reach it by a gather to rank 0 (all of them, in
    fp32: the right trade for a model a CPU or one GPU trains; vLLM streams instead)."""

    def __init__(self, config: RunConfig, max_len: int):
        self.config, self.max_len = config, max_len
        self.engine = None
        self.version = 0

    def push_weights(self, model_chunks, version: int, *, draft_only: bool = False) -> dict:
        weights = gather_serving_weights(model_chunks, self.config.model)
        if weights is not None and draft_only:
            weights = {k: v for k, v in weights.items() if ".mtp." in k}
        on_rank0(lambda: self._load(weights, version), share=False)
        self.version = version
        return {}

    def _load(self, weights: dict, version: int) -> None:
        if self.engine is not None:
            self.engine.update_weights(weights, version=version)
            return
        from mimo_train.rollout.engine import Engine, EngineConfig

        rl = self.config.rl
        auto = rl.spec_depth == "auto"
        self.engine = Engine(self.config.model, weights, EngineConfig(
            max_batch=min(rl.engine_max_batch, rl.prompts_per_step * rl.group_size), max_len=self.max_len,
            seed=self.config.train.seed, auto_depth=auto), version=version)
        self.engine.fixed_depth = None if auto else rl.spec_depth

    def generate(self, prompts, params):
        return self.engine.generate(prompts, params)

    def pause(self) -> None:  # generate() runs to completion in this process: nothing is ever in flight
        pass

    def resume(self) -> None:
        pass

    def close(self) -> None:
        self.engine = None


def make_backend(config: RunConfig, max_len: int) -> RolloutBackend:
    """The configured backend, on every rank (rank 0 starts what it must)."""
    if config.rollout.backend == "vllm":
        from mimo_train.rl.vllm_rollout import VLLMRollout

        return VLLMRollout(config, max_len)
    return NativeRollout(config, max_len)


"""`Engine`: continuous-batching generation with MTP speculative decoding.

One iteration of `step()`:
  1. admit waiting requests into free slots: prefill the main model over their prompts, sample
     their first token, prefill the MTP layers' caches;
  2. draft: the MTP chain proposes K tokens per active row (K: fixed, chosen each step by
     AutoDepth, or from the depth table);
  3. verify: one main-model forward over [last token, K drafts] (K+1 positions), speculative
     rejection sampling (kernels/sampling.py) keeps 1..K+1 tokens per row;
  4. roll rejected entries out of the caches, hand the tokens to their requests (the one
     host synchronisation of the iteration), and free the slots of finished requests by
     moving the last active row into the hole, so active rows are always rows [0, n).
This module is the host side (requests, slots, stopping, metrics); rollout/decode.py the device
side (per-slot tensors, prefill, draft, verify).
"""

from __future__ import annotations

import collections
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mimo_train.model.config import ModelConfig
from mimo_train.rollout import weights as weight_io
from mimo_train.rollout.api import Completion, DraftCounts, Metrics, SamplingParams
from mimo_train.rollout.cache import KVCache
from mimo_train.rollout.decode import SlotState
from mimo_train.rollout.depth import AutoDepth, measure_step_costs
from mimo_train.rollout.model import InferenceModel
from mimo_train.rollout.rng import request_seed


@dataclass
class EngineConfig:
    max_batch: int = 16  # slots: requests decoded together
    max_len: int = 2048  # prompt + generated tokens per request (capped by the model's max)
    # Speculative depth per batch size: {batch upper bound: K}; the smallest bound >= the
    # active batch applies (the largest bound beyond it). None: every MTP layer at any batch.
    depth_table: dict[int, int] | None = None
    # Or choose K every step (rollout/depth.py AutoDepth): step costs per (batch, K) timed at
    # start-up and then by the steps that run, weighed with the running acceptance of the drafts;
    # until drafts have been verified, each is assumed accepted with probability expected_acceptance.
    auto_depth: bool = False
    expected_acceptance: float = 0.7
    device: str | None = None  # default: cuda if available, else cpu
    dtype: torch.dtype | None = None  # default: bfloat16 on cuda, float32 on cpu
    seed: int = 0  # seeds requests that bring none


@dataclass
class _Request:
    id: int
    prompt_index: int
    sample_index: int
    prompt: list[int]
    params: SamplingParams
    key: int
    stop: frozenset[int]
    version: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str = ""
    drafts: DraftCounts = field(default_factory=DraftCounts)


class Engine:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], config: EngineConfig | None = None,
                 *, version: int = 0):
        self.cfg, self.config = cfg, config or EngineConfig()
        c = self.config
        self.device = torch.device(c.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = c.dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.max_len = min(c.max_len, cfg.max_position_embeddings)
        self.max_depth = cfg.num_nextn_predict_layers
        if c.max_batch < 1 or self.max_len < 2:
            raise ValueError(f"EngineConfig: need max_batch >= 1 and max_len >= 2, got {c.max_batch}, {self.max_len}")
        if c.auto_depth and (c.depth_table or not 0 <= c.expected_acceptance <= 1):
            raise ValueError("EngineConfig: auto_depth chooses K itself: give it no depth_table, and an "
                             f"expected_acceptance in [0, 1] (got {c.expected_acceptance})")
        self.w = weight_io.allocate(cfg, self.device, self.dtype)
        weight_io.load(self.w, dict(weights), complete=True)
        self.version = version
        B, Km = c.max_batch, self.max_depth
        self.cache = KVCache(cfg, max_batch=B, max_len=self.max_len + Km, max_depth=Km, mtp_layers=Km,
                             device=self.device, dtype=self.dtype)
        self.model = InferenceModel(cfg, self.w, self.cache)
        self.state = SlotState(cfg, self.model, B)
        self.depth_table = dict(c.depth_table) if c.depth_table else {B: Km}
        for bound, k in self.depth_table.items():
            if not (0 <= k <= Km) or bound < 1:
                raise ValueError(f"depth_table entry {bound}: {k} needs batch >= 1 and 0 <= K <= {Km} MTP layers")
        self.n = 0  # active requests: rows [0, n) of every per-slot tensor
        self.slots: list[_Request | None] = [None] * B
        self.waiting: collections.deque[_Request] = collections.deque()
        self.unclaimed: list[Completion] = []  # finished requests not collected by a generate() call
        self._next_id, self._rng = 0, random.Random(c.seed)
        self._stats = collections.Counter()
        self._drafts = DraftCounts.zeros(Km)  # every request's, pooled (Metrics)
        self.fixed_depth: int | None = None  # set: every step drafts this many tokens, whatever else says
        self.auto: AutoDepth | None = None
        self.last_decode_seconds = 0.0
        if c.auto_depth:
            self.auto = AutoDepth(measure_step_costs(self), prior=c.expected_acceptance)

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None, **overrides) -> "Engine":
        """Load a serving-format directory (config.json + safetensors; never remote code).
        A block-FP8 directory (`tools/export.py --fp8`, the FP8 release) is dequantised on load
        (`model.load.read_weights`) and runs in `config.dtype`: the engine has no FP8 matmul."""
        from mimo_train.model.load import config_for_weights, read_weights  # megatron import: only here

        weights = read_weights(path)
        return cls(config_for_weights(Path(path), weights), weights, config or EngineConfig(**overrides))

    # ---- weights ---------------------------------------------------------------------------
    def update_weights(self, named_tensors, *, version: int | None = None) -> int:
        """Replace weights given by serving name (main and MTP layers, any subset), then bump the
        policy version (or set it). Unknown names or wrong shapes raise WeightNameError and
        change nothing; requests in flight keep running either way. Returns the new version."""
        items = dict(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        weight_io.load(self.w, items)
        self.version = self.version + 1 if version is None else int(version)
        return self.version

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The current weights under serving names (views: clone to keep)."""
        return dict(self.w.views)

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None, *, prompt_index: int = 0) -> list[int]:
        """Queue params.n samples of one prompt (token ids); returns their request ids. Bad
        input raises ValueError here, before anything is queued."""
        params = params or SamplingParams()
        prompt = self._check_prompt(prompt, params)
        base = params.seed if params.seed is not None else self._rng.getrandbits(63)
        stop = frozenset(params.stop_token_ids) | (
            {self.cfg.eos_token_id} if self.cfg.eos_token_id is not None and not params.ignore_eos else set())
        ids = []
        for i in range(params.n):
            req = _Request(self._next_id, prompt_index, i, prompt, params, request_seed(base, prompt_index, i),
                           stop, self.version, drafts=DraftCounts.zeros(self.max_depth))
            self._next_id += 1
            self.waiting.append(req)
            ids.append(req.id)
        return ids

    def abort_all(self) -> None:
        """Drop every queued and running request, without completions."""
        self.waiting.clear()
        self.slots = [None] * self.config.max_batch
        self.n = 0

    def _check_prompt(self, prompt, params: SamplingParams) -> list[int]:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, str):
            raise ValueError("prompts are token ids, not strings: tokenize first")
        prompt = list(prompt)
        if not prompt:
            raise ValueError("empty prompt: a request needs at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("prompt must be a list of int token ids")
        vocab = self.cfg.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt has token ids outside [0, {vocab}): {bad[:5]}")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit: max length is {self.max_len} "
                             f"(prompt + at least one new token)")
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids outside the vocabulary [0, {vocab})")
        return prompt

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, *,
                 depth: int | None = None) -> tuple[list[Completion], Metrics]:
        """Sample every prompt (token-id lists) to completion. Returns completions ordered by
        prompt, then sample index, and the call's metrics. `depth` fixes K for this call
        instead of auto or the depth table. All input is checked before any request is queued."""
        if isinstance(prompts, torch.Tensor) or (prompts and isinstance(prompts[0], int)):
            raise ValueError("prompts must be a list of token-id lists (one per prompt)")
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            try:
                self._check_prompt(p, sp)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        if depth is not None and not 0 <= depth <= self.max_depth:
            raise ValueError(f"depth must be in [0, {self.max_depth}] (the model's MTP layers), got {depth}")
        mine = set()
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            mine.update(self.add_request(p, sp, prompt_index=i))
        before, start = self._snapshot(), time.perf_counter()
        saved, done = self.fixed_depth, []
        self.fixed_depth = depth if depth is not None else saved
        try:
            while len(done) < len(mine):
                for c in self.step():
                    (done if c.request_id in mine else self.unclaimed).append(c)
        finally:
            self.fixed_depth = saved
        metrics = self._metrics(before, time.perf_counter() - start)
        return sorted(done, key=lambda c: (c.prompt_index, c.sample_index, c.request_id)), metrics

    # ---- the iteration -----------------------------------------------------------------------
    def depth_for(self, batch: int) -> int:
        """This step's K: a fixed depth (generate's `depth`), else auto, else the depth table."""
        if self.fixed_depth is not None:
            return self.fixed_depth
        if self.auto is not None:
            return self.auto.choose(batch)
        bounds = sorted(self.depth_table)
        return self.depth_table[next((b for b in bounds if b >= batch), bounds[-1])]

    @torch.inference_mode()
    def step(self) -> list[Completion]:
        """One iteration (admit, draft, verify, retire); returns the requests finished in it."""
        finished = self._admit()
        n = self.n
        if n == 0:
            return finished
        K = self.depth_for(n)
        greedy, top_k, top_p = self._sampling_flags(self.slots[:n])
        lengths = [len(r.prompt) + len(r.tokens) for r in self.slots[:n]]
        bound = _round_up(max(lengths) + K, 64)
        start = time.perf_counter()
        n_acc, out, logprobs = self.state.decode(n, K, min(bound, self.cache.max_len), greedy, top_k, top_p, lengths)
        n_acc, out, logprobs = n_acc.tolist(), out.tolist(), logprobs.tolist()  # the host sync
        self.last_decode_seconds = time.perf_counter() - start  # what AutoDepth weighs
        if self.auto is not None:
            self.auto.observe_cost(n, K, self.last_decode_seconds)
        self._stats.update(steps=1, busy=n, **{f"depth{K}": 1})
        done_rows, kept = [], []
        for r in range(n):
            req = self.slots[r]
            before = len(req.tokens)
            if self._emit(req, out[r][:n_acc[r] + 1], logprobs[r]):
                done_rows.append(r)
            # Drafts accepted past the request's stop token or length limit never reach it: the
            # statistics count the accepted drafts it took, min(n_acc, taken).
            taken = len(req.tokens) - before
            kept.append(min(n_acc[r], taken))
            for counts in (req.drafts, self._drafts):
                counts.add_step(K, kept[-1], taken)
        if self.auto is not None:
            self.auto.observe(K, kept)
        return finished + self._retire(done_rows)

    @staticmethod
    def _sampling_flags(reqs) -> tuple[bool, bool, bool]:
        """Host-side facts about a batch that pick cheaper code: all greedy, any top-k, any top-p."""
        return (all(r.params.temperature == 0 for r in reqs), any(r.params.top_k > 0 for r in reqs),
                any(r.params.top_p < 1 for r in reqs))

    def _admit(self) -> list[Completion]:
        """Prefill waiting requests into free slots; returns those already finished (n=1 token)."""
        free = self.config.max_batch - self.n
        if not self.waiting or free == 0:
            return []
        with torch.inference_mode():
            return self._prefill([self.waiting.popleft() for _ in range(min(free, len(self.waiting)))])

    def _prefill(self, reqs: list[_Request]) -> list[Completion]:
        n0 = self.n
        if any(r.params.return_routed_experts for r in reqs):
            self.state.track_routing()
        self.slots[n0:n0 + len(reqs)] = reqs
        first, logprobs = self.state.prefill(n0, [r.prompt for r in reqs], [r.params for r in reqs],
                                             [r.key for r in reqs], *self._sampling_flags(reqs))
        self.n += len(reqs)
        self._stats.update(prefill_tokens=sum(len(r.prompt) for r in reqs))
        first, logprobs = first.tolist(), logprobs.tolist()
        done = [n0 + i for i, r in enumerate(reqs) if self._emit(r, [first[i]], [logprobs[i]])]
        return self._retire(done)

    def _emit(self, req: _Request, tokens: list[int], logprobs: list[float]) -> bool:
        """Hand tokens to a request, stopping where it must; True when it is finished."""
        for t, lp in zip(tokens, logprobs):
            req.tokens.append(t)
            req.logprobs.append(lp)
            self._stats["tokens"] += 1
            if t in req.stop:
                req.finish = "stop"
                return True
            if len(req.tokens) >= req.params.max_new_tokens or len(req.prompt) + len(req.tokens) >= self.max_len:
                req.finish = "length"
                return True
        return False

    def _retire(self, rows: list[int]) -> list[Completion]:
        """Completions of the finished rows, whose slots are refilled by the last active rows."""
        out = []
        for r in sorted(rows, reverse=True):
            req = self.slots[r]
            routed = None
            if req.params.return_routed_experts:
                routed = self.state.routed[r, :len(req.prompt) + len(req.tokens) - 1].to("cpu", torch.long)
            out.append(Completion(req.id, req.prompt_index, req.sample_index, req.prompt, req.tokens, req.logprobs,
                                  req.finish, req.version, self.version, routed, req.drafts))
            last = self.n - 1
            if r != last:
                self._move_row(last, r)
            self.slots[last] = None
            self.n -= 1
        return out[::-1]

    def _move_row(self, src: int, dst: int) -> None:
        self.state.move_row(src, dst)
        self.slots[dst] = self.slots[src]

    # ---- metrics -----------------------------------------------------------------------------
    def _snapshot(self):
        return collections.Counter(self._stats), DraftCounts.total([self._drafts])  # copies

    def _metrics(self, before, seconds: float) -> Metrics:
        stats, drafts0 = before
        d = collections.Counter(self._stats)
        d.subtract(stats)
        drafts = self._drafts.minus(drafts0)
        return Metrics(
            tokens=d["tokens"], seconds=seconds, tokens_per_s=d["tokens"] / seconds if seconds > 0 else 0.0,
            steps=d["steps"], row_steps=drafts.steps, mean_accept_length=drafts.accept_length or 0.0,
            acceptance_per_position=drafts.acceptance_per_position,
            occupancy=d["busy"] / (d["steps"] * self.config.max_batch) if d["steps"] else 0.0,
            depth_steps={int(name[5:]): v for name, v in d.items() if name.startswith("depth") and v},
            prefill_tokens=d["prefill_tokens"])


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple

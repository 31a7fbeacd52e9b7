"""HTTP client of one vLLM server: token-in / token-out completions, the RL control routes
(pause, resume, weight transfer), Prometheus counters.

Requests that fail for a reason that may pass (connection refused or reset, timeout, 5xx) are
retried with exponential backoff, then raise `ServerUnavailable`; a 4xx (our request was bad)
raises ValueError at once (`mimo_train.rollout.http_json`).
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass

import torch

from mimo_train.rollout import http_json
from mimo_train.rollout.api import SamplingParams


class ServerUnavailable(RuntimeError):
    pass


@dataclass
class Sample:
    """One completion as vLLM returns it."""

    tokens: list[int]
    logprobs: list[float]  # log-probs of the sampled tokens after temperature (processed_logprobs)
    finish_reason: str  # "stop" or "length"
    routed_experts: torch.Tensor | None  # [prompt + tokens - 1, all layers, top-k] when the server returns them


SPEC_COUNTERS = ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                 "vllm:spec_decode_num_accepted_tokens_total")
_PER_POS = re.compile(r'^vllm:spec_decode_num_accepted_tokens_per_pos_total\{[^}]*position="(\d+)"[^}]*\} (\S+)$')


class VLLMClient:
    def __init__(self, url: str, *, timeout_s: float = 600.0, retries: int = 3, backoff_s: float = 0.5,
                 describe: str = ""):
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.describe = describe or self.url  # how errors name the server (its command and log, if we started it)
        self._model: str | None = None

    # ---- transport -----------------------------------------------------------------------------
    def call(self, method: str, path: str, body: dict | None = None, *, timeout_s: float | None = None,
             retries: int | None = None, raw: bool = False):
        try:
            return http_json.request(self.url + path, method, body, timeout_s=timeout_s or self.timeout_s,
                                retries=self.retries if retries is None else retries, backoff_s=self.backoff_s, raw=raw)
        except http_json.Refused as e:
            raise ValueError(f"vLLM server {self.url} refused {method} {path} (HTTP {e.code}): {e.message[:2000]}") \
                from None
        except http_json.Unavailable as e:
            raise ServerUnavailable(f"vLLM server {self.describe}: {method} {path} failed after {e.attempts} "
                                    f"attempt(s); last error: {e.last[:2000]}") from None

    # ---- facts -----------------------------------------------------------------------------------
    def healthy(self) -> bool:
        try:
            self.call("GET", "/health", retries=0, timeout_s=5, raw=True)
            return True
        except (ServerUnavailable, ValueError):
            return False

    @property
    def model(self) -> str:
        """The served model's name (what completions requests must say) and where it was read."""
        if self._model is None:
            self._model = self.call("GET", "/v1/models")["data"][0]["id"]
        return self._model

    def model_root(self) -> str | None:
        return self.call("GET", "/v1/models")["data"][0].get("root")

    def world_size(self) -> int:
        """Processes of the server (TP x PP x DP): each joins the weight-transfer group."""
        return int(self.call("GET", "/get_world_size?include_dp=true")["world_size"])

    def spec_counters(self) -> tuple[list[float], list[float]]:
        """(drafts, draft tokens, accepted tokens) and accepted tokens per draft position, as
        counted since the server started (Prometheus /metrics)."""
        text = self.call("GET", "/metrics", raw=True)
        totals, per_pos = [0.0] * len(SPEC_COUNTERS), {}
        for line in text.splitlines():
            for i, name in enumerate(SPEC_COUNTERS):
                if line.startswith(name + "{") or line.startswith(name + " "):
                    totals[i] += float(line.rsplit(" ", 1)[1])
            m = _PER_POS.match(line)
            if m:
                per_pos[int(m.group(1))] = per_pos.get(int(m.group(1)), 0.0) + float(m.group(2))
        return totals, [per_pos[k] for k in sorted(per_pos)]

    # ---- generation ------------------------------------------------------------------------------
    def complete(self, prompt: list[int], params: SamplingParams, seed: int | None) -> Sample:
        """One sample of one prompt (token ids in, token ids out)."""
        body = {"model": self.model, "prompt": [list(prompt)], "n": 1, "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k or -1,
                "seed": seed, "stop_token_ids": list(params.stop_token_ids), "ignore_eos": params.ignore_eos,
                "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False}
        choice = self.call("POST", "/v1/completions", body)["choices"][0]
        tokens = list(choice["token_ids"])
        logprobs = [float(x) for x in (choice.get("logprobs") or {}).get("token_logprobs") or []]
        if len(logprobs) != len(tokens):
            raise ServerUnavailable(f"vLLM server {self.describe} returned {len(logprobs)} log-probs for "
                                    f"{len(tokens)} tokens")
        finish = "stop" if choice.get("finish_reason") == "stop" else "length"
        return Sample(tokens, logprobs, finish, decode_routed_experts(choice.get("routed_experts")))

    def prompt_logprobs(self, sequences: list[list[int]], top_k: int = 0) -> list[list[dict[int, tuple[float, int]]]]:
        """For each token sequence, the target's next-token distribution at every position but
        the first: {token id: (log-prob, rank)} holding the token found there and the top_k
        (rank 1 = most likely). vLLM computes prompt log-probs at temperature 1 whatever the
        request says; one token is generated per sequence and ignored."""
        body = {"model": self.model, "prompt": [list(s) for s in sequences], "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": top_k, "skip_special_tokens": False}
        choices = sorted(self.call("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
        out = []
        for seq, choice in zip(sequences, choices):
            rows = choice.get("prompt_logprobs") or []
            if len(rows) != len(seq):
                raise ServerUnavailable(f"vLLM server {self.describe} returned prompt log-probs for {len(rows)} "
                                        f"positions of a {len(seq)}-token prompt")
            out.append([{int(t): (float(v["logprob"]), int(v["rank"])) for t, v in row.items()} for row in rows[1:]])
        return out

    # ---- RL control ------------------------------------------------------------------------------
    def pause(self) -> None:
        """Stop admitting requests, wait for those in flight, drop the KV and prefix caches (they
        were computed with the old weights)."""
        self.call("POST", "/pause?mode=wait&clear_cache=true")

    def resume(self) -> None:
        self.call("POST", "/resume")

    def init_weight_transfer(self, init_info: dict) -> None:
        self.call("POST", "/init_weight_transfer_engine", {"init_info": init_info}, retries=0)

    def start_weight_update(self, *, draft: bool) -> None:
        self.call("POST", "/start_draft_weight_update" if draft else "/start_weight_update", {}, retries=0)

    def update_weights(self, buckets: list[dict]) -> None:
        self.call("POST", "/update_weights", {"update_info": {"buckets": buckets}}, retries=0)

    def finish_weight_update(self, version: int) -> None:
        self.call("POST", "/finish_weight_update", {"weight_version": str(version)}, retries=0)

    def weight_version(self) -> str | None:
        return self.call("GET", "/weight_info").get("weight_version")


def spec_delta(before: list, after: list) -> tuple[int, float, list[float]]:
    """Drafting between two readings of `spec_counters()` of each server (lists, one reading per
    server): (drafts, i.e. (request, verify step) pairs; mean accept length, tokens kept per
    verify, 1 when nothing drafted; acceptance rate of each draft position)."""
    drafts = int(sum(a[0][0] - b[0][0] for a, b in zip(after, before)))
    accepted = sum(a[0][2] - b[0][2] for a, b in zip(after, before))
    positions = max((len(a[1]) for a in after), default=0)
    per_pos = [sum((a[1][k] if k < len(a[1]) else 0.0) - (b[1][k] if k < len(b[1]) else 0.0)
                   for a, b in zip(after, before)) for k in range(positions)]
    if not drafts:
        return 0, 1.0, []
    return drafts, 1.0 + accepted / drafts, [x / drafts for x in per_pos]


def decode_routed_experts(field: str | None) -> torch.Tensor | None:
    """vLLM's `routed_experts`: base64 of an .npy array [tokens - 1, layers, top-k] (no pickles)."""
    if not field:
        return None
    import numpy as np

    array = np.load(io.BytesIO(base64.b64decode(field)), allow_pickle=False)
    return torch.from_numpy(array.astype("int64"))

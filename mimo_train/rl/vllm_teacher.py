"""MOPD teachers on vLLM servers: the student's tokens scored by vLLM's prompt log-probs.

A teacher entry with `vllm: true` is served by vLLM, either at `server` (a URL: a server started
elsewhere, e.g. by a cluster launcher from the teacher's export) or on a server this run starts
from `checkpoint`: the teacher's weights are written once under <run_dir>/vllm/teacher_<name>/
in the served geometry (`write_model_dir`) and vLLM reads them there. Entries with the same
checkpoint and tensor_parallel share one server. The servers use rollout.vllm's environment
(python, dtype, KV cache, eager mode, start-up timeout, extra arguments) whatever the rollout
backend is, and stop when the run stops (the watchdog, as for rollout servers).

Scoring: one completions request per batch of pairs, prompt = prompt + response, with
`prompt_logprobs=k`: vLLM returns at every position the log-prob of the token found there and
the top k. vLLM computes prompt log-probs from the raw logits (temperature 1, whatever the
request says; measured on 0.32), so a vLLM teacher scores at temperature 1 only: RLConfig
refuses vLLM teachers with rl.temperature != 1.

Failures are handled as for the HTTP teacher: connection errors, timeouts and 5xx are retried
with backoff (rl.teacher_retries, rl.teacher_timeout_s), then `TeacherUnavailable` names the
teacher, its server and, for a server this run started that has stopped, the first error of its log.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from mimo_train.rl.teachers import (TeacherSpec, TeacherUnavailable, TokenScores, _lists, check_request, empty_scores,
                                    tokenizer_fingerprint)
from mimo_train.rollout.vllm.client import ServerUnavailable, VLLMClient
from mimo_train.rollout.vllm.server import VLLMServer, first_error, read_model_dir, write_model_dir

BATCH = 64  # pairs per request: few round trips, bounded answers (each position carries k + 1 entries)


class VLLMTeacher:
    def __init__(self, spec: TeacherSpec, client: VLLMClient, *, vocab_size: int | None, max_len: int,
                 tokenizer_dir: str | Path | None, server: VLLMServer | None = None):
        self.spec, self.name, self.domain = spec, spec.name, spec.domain
        self.client, self.server, self.url = client, server, client.url
        self.vocab_size, self.max_len, self.tokenizer_dir = vocab_size, max_len, tokenizer_dir

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return tokenizer_fingerprint(self.tokenizer_dir)

    def info(self) -> dict:
        return dict(name=self.name, vocab_size=self.vocab_size, tokenizer_fingerprint=self.tokenizer_fingerprint,
                    max_len=self.max_len, url=self.url)

    def logprobs(self, prompts, responses, temperature: float = 1.0) -> list[torch.Tensor]:
        return [s.logprobs for s in self.score(prompts, responses, temperature)]

    def score(self, prompts, responses, temperature: float = 1.0, top_k: int = 0) -> list[TokenScores]:
        prompts, responses = _lists(prompts), _lists(responses)
        check_request(prompts, responses, self.vocab_size or 1 << 62, self.max_len, temperature)
        if temperature not in (0, 1):
            raise ValueError(f"teacher {self.name!r} is served by vLLM, whose prompt log-probs are at temperature 1; "
                             f"asked for {temperature}: set rl.temperature=1 or run this teacher in-process")
        out = [empty_scores(top_k) for _ in prompts]
        todo = [i for i, r in enumerate(responses) if r]
        for start in range(0, len(todo), BATCH):
            chunk = todo[start:start + BATCH]
            rows = self._call(lambda: self.client.prompt_logprobs([prompts[i] + responses[i] for i in chunk], top_k))
            for i, per_position in zip(chunk, rows):
                out[i] = _scores(per_position[len(prompts[i]) - 1:], responses[i], top_k)
        return out

    def _call(self, fn):
        try:
            return fn()
        except ServerUnavailable as e:
            where = f"teacher {self.name!r} (domain {self.domain!r}) on vLLM at {self.url}"
            if self.server is not None and not self.server.alive():
                raise TeacherUnavailable(f"{where}: the server has stopped: {first_error(self.server.spec.log)}; "
                                         f"command {self.server.describe()}") from None
            raise TeacherUnavailable(f"{where} did not answer: {e}") from None
        except ValueError as e:
            raise ValueError(f"teacher {self.name!r} (domain {self.domain!r}): {e}") from None

    def close(self) -> None:  # servers are shared between teachers: `VLLMTeachers.close` stops them
        pass


def _scores(per_position: list[dict[int, tuple[float, int]]], response: list[int], k: int) -> TokenScores:
    """Position t's {token: (log-prob, rank)} -> the response token's log-prob and the top k."""
    logprobs = torch.tensor([row[tok][0] for row, tok in zip(per_position, response)], dtype=torch.float32)
    top = [sorted(row.items(), key=lambda item: -item[1][0])[:k] for row in per_position]
    ids = torch.tensor([[t for t, _ in entries] for entries in top], dtype=torch.long).reshape(len(response), k)
    values = torch.tensor([[v[0] for _, v in entries] for entries in top], dtype=torch.float32).reshape(len(response), k)
    return TokenScores(logprobs, ids, values)


class VLLMTeachers:
    """The vLLM teachers of a run and the servers it started for them (one per checkpoint)."""

    def __init__(self, config, specs: list[tuple[TeacherSpec, int]], max_len: int, top_k: int = 0):
        """specs: (spec, tensor_parallel) of every vLLM teacher; max_len: the longest prompt +
        response to score."""
        self.config, self.v, self.rl = config, config.rollout.vllm, config.rl
        self.max_len, self.top_k = max_len, top_k
        self.servers: list[VLLMServer] = []
        self.teachers: dict[str, VLLMTeacher] = {}
        try:
            started: dict[tuple[str, int], tuple[VLLMServer, Path | None, int]] = {}
            for spec, tp in specs:
                if not spec.server and (spec.checkpoint, tp) not in started:
                    started[(spec.checkpoint, tp)] = self._start(spec, tp)
            for server, _, _ in started.values():
                server.wait_ready(self.v.startup_timeout_s)
            for spec, tp in specs:
                self.teachers[spec.domain] = self._reach(spec) if spec.server else self._teacher(spec, *started[(spec.checkpoint, tp)])
        except BaseException:
            self.close()
            raise

    def _client(self, url: str, describe: str = "") -> VLLMClient:
        return VLLMClient(url, timeout_s=self.rl.teacher_timeout_s, retries=self.rl.teacher_retries, describe=describe)

    def _start(self, spec: TeacherSpec, tp: int) -> tuple[VLLMServer, Path | None, int]:
        from mimo_train.rl.policy_io import read_policy

        where = f"teacher {spec.name!r} (domain {spec.domain!r})"
        try:
            policy = read_policy(spec.checkpoint, mtp=False)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{where}: {e}; fix the path in the teachers config or train the teacher first") from e
        except ValueError as e:
            raise ValueError(f"{where}: cannot load the checkpoint at {spec.checkpoint}: {e}") from e
        cfg = dataclasses.replace(policy.config, num_nextn_predict_layers=0)  # a teacher never drafts
        cuda = torch.cuda.is_available()
        geometry = self.v.geometry(cfg, cuda)
        directory = self.config.run_dir / "vllm" / f"teacher_{spec.name}"
        # vLLM loads a tokenizer even for ids in and out: the teacher's own, else the student's.
        write_model_dir(directory / "model", cfg, policy.tokenizer or self.config.data.tokenizer,
                        pad_v_head=geometry.pad_v_head, weights=policy.weights)
        server_spec = self.v.server_spec(
            cuda=cuda, model=directory / "model", port=0, log=directory / "server.log",
            tensor_parallel=tp, max_model_len=self.max_len + 1,  # + the one token each scoring request generates
            max_num_seqs=BATCH, dummy_weights=False, max_logprobs=max(20, self.top_k))
        server = VLLMServer(server_spec).start()
        self.servers.append(server)
        return server, policy.tokenizer, cfg.vocab_size

    def _teacher(self, spec: TeacherSpec, server: VLLMServer, tokenizer: Path | None, vocab: int) -> VLLMTeacher:
        client = self._client(server.url, server.describe())
        return VLLMTeacher(spec, client, vocab_size=vocab, max_len=self.max_len, tokenizer_dir=tokenizer, server=server)

    def _reach(self, spec: TeacherSpec) -> VLLMTeacher:
        """A server started elsewhere: its vocabulary and tokenizer are read from its model
        directory when this machine can see it (else only the token ids' range is checked)."""
        client = self._client(spec.server)
        if not client.healthy():
            raise TeacherUnavailable(f"teacher {spec.name!r} (domain {spec.domain!r}): no vLLM server answers at "
                                     f"{spec.server}/health")
        model = client.call("GET", "/v1/models")["data"][0]
        config, tokenizer = read_model_dir(model.get("root"))
        vocab = config.get("vocab_size") if config else None
        max_len = int(model.get("max_model_len") or self.max_len + 1) - 1
        return VLLMTeacher(spec, client, vocab_size=vocab, max_len=max_len, tokenizer_dir=tokenizer)

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers = []


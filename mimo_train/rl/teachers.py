"""MOPD teachers: frozen, forward-only policies that score the student's own tokens.

For a prompt x of domain d and the student's response y, d's teacher returns log π(y_t | x, y_<t)
for every t (one teacher per prompt, never an average), and on request its top-k next tokens at
each t (ids and log-probs: what distribution-level distillation needs). It runs in-process
(`InProcessTeacher`: its own rollout Engine, so scoring never touches the student's), behind
tools/serve_teacher.py (`RemoteTeacher`: HTTP on 127.0.0.1, timeouts, retries; top-k on request,
split under the server's per-request limit) or on a vLLM server (`mimo_train.rl.vllm_teacher.VLLMTeacher`);
`TeacherSpec.server` and `TeacherSpec.vllm` pick one.
Per-token comparison needs shared token ids: `check_compatible` refuses a teacher whose
vocabulary size or tokenizer differs, before training starts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TeacherSpec:
    name: str
    domain: str
    # training checkpoint dir or serving dir (block FP8 is dequantised on load); what the server
    # loads when `server` is set
    checkpoint: str
    server: str | None = None  # "http://127.0.0.1:PORT": a tools/serve_teacher.py process; None: in-process
    vllm: bool = False  # served by vLLM: at `server` if set, else on a server the run starts from `checkpoint`


@dataclass
class TokenScores:
    """A teacher's scores of one response of n tokens."""

    logprobs: torch.Tensor  # [n] float32: log pi(y_t | x, y_<t)
    top_ids: torch.Tensor  # [n, k] int64: the k most likely next tokens at each t, most likely first
    top_logprobs: torch.Tensor  # [n, k] float32: their log-probs (k = 0 unless asked)


def empty_scores(k: int = 0) -> TokenScores:
    return TokenScores(torch.zeros(0), torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k))


class TeacherUnavailable(RuntimeError):  # a teacher server did not answer after every retry
    pass


class TeacherMismatch(ValueError):  # a teacher's token ids do not mean what the student's mean
    pass


# ---- scoring -----------------------------------------------------------------------------------
def check_request(prompts, responses, vocab_size: int, max_len: int, temperature=1.0, top_k=0) -> None:
    """ValueError naming the first bad item; shared by in-process scoring and the server's 400s."""
    if not isinstance(prompts, list) or not isinstance(responses, list):
        raise ValueError("prompts and responses must be lists of token-id lists")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means 1, as for greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be an int in [0, {vocab_size}] (the vocabulary size): the number of most "
                         f"likely tokens returned per position; got {top_k!r}")
    for i, (p, r) in enumerate(zip(prompts, responses)):
        for what, ids in (("prompt", p), ("response", r)):
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"{what} {i} must be a list of int token ids")
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"{what} {i} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        if not p:
            raise ValueError(f"prompt {i} is empty: the first response token needs a context")
        if len(p) + len(r) > max_len:
            raise ValueError(f"pair {i}: prompt + response = {len(p) + len(r)} tokens exceeds the teacher engine's "
                             f"max_len {max_len} (raise EngineConfig.max_len)")


def _lists(seqs) -> list[list]:
    return [x.tolist() if isinstance(x, torch.Tensor) else list(x) for x in seqs]


@torch.no_grad()  # not inference_mode: the trainer multiplies these into a loss that autograd saves
def score_tokens(engine, prompts: list[list[int]], responses: list[list[int]],
                 temperature: float = 1.0, top_k: int = 0) -> list[TokenScores]:
    """log_softmax(logits / T) of each response token given prompt + earlier response tokens,
    float32 [len(response)] per pair (T = 0 means 1, as in Completion.logprobs), and the top_k
    tokens of that distribution at each position.

    One prefill-mode forward per batch (attention over the block itself: exactly what a full
    forward computes) in the engine's free cache rows [engine.n, max_batch), so the rows and
    per-slot state of running requests are not touched. Not thread-safe with engine.step():
    call it between steps (teachers own their engine; this matters only for a student's)."""
    prompts, responses = _lists(prompts), _lists(responses)
    check_request(prompts, responses, engine.cfg.vocab_size, engine.max_len, temperature, top_k)
    free = engine.config.max_batch - engine.n
    if free < 1:
        raise RuntimeError("score_tokens: every slot of the engine is busy; score between generate() calls")
    t = float(temperature) if temperature > 0 else 1.0
    model, dev = engine.model, engine.device
    out = [empty_scores(top_k) for _ in prompts]
    # The last response token is only ever a target, so it is not fed in. Longest first, so
    # pairs of similar length share a batch and padding stays small.
    todo = sorted((i for i, r in enumerate(responses) if r), key=lambda i: -(len(prompts[i]) + len(responses[i])))
    for start in range(0, len(todo), free):
        chunk = todo[start:start + free]
        seqs = [prompts[i] + responses[i][:-1] for i in chunk]
        m, width = len(seqs), max(map(len, seqs))
        lens = torch.tensor([len(s) for s in seqs], device=dev)
        pos = torch.arange(width, device=dev) - (width - lens)[:, None]  # right-aligned, < 0 = padding
        tokens = torch.zeros(m, width, dtype=torch.long, device=dev)
        for j, s in enumerate(seqs):
            tokens[j, width - len(s):] = torch.tensor(s, device=dev)
        rows = slice(engine.n, engine.n + m)
        h = model.forward(tokens, model.slots(rows, pos, prefill=True))
        # Right alignment puts each pair's scored positions (last prompt token .. response[-2]) last.
        n_resp = [len(responses[i]) for i in chunk]
        picked = torch.cat([h[j, width - n:] for j, n in enumerate(n_resp)])
        targets = torch.tensor([tok for i in chunk for tok in responses[i]], device=dev)
        dist = (model.logits(picked) / t).log_softmax(-1).float()
        logp = dist.gather(1, targets[:, None]).squeeze(1).cpu()
        top_lp, top_ids = (x.cpu() for x in dist.topk(top_k, dim=-1))
        for i, lp, ids, tlp in zip(chunk, logp.split(n_resp), top_ids.split(n_resp), top_lp.split(n_resp)):
            out[i] = TokenScores(lp.clone(), ids.clone(), tlp.clone())
    return out


# ---- tokenizers --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _fingerprint(directory: str) -> str:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 -- any loader failure is the same user problem
        raise ValueError(f"cannot load the tokenizer in {directory}: {e}") from e
    # The id of every token string is what must agree; special tokens are part of the mapping.
    mapping = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(mapping, ensure_ascii=False).encode()).hexdigest()[:16]


def tokenizer_fingerprint(directory: str | Path | None) -> str | None:
    """A hash of the tokenizer's token -> id mapping (None without a directory)."""
    return None if directory is None else _fingerprint(str(Path(directory).resolve()))


# ---- teachers ----------------------------------------------------------------------------------
class InProcessTeacher:
    """A frozen teacher in this process: its own Engine (no MTP layers: it never drafts)."""

    def __init__(self, spec: TeacherSpec, engine_config=None):
        from mimo_train.rl.policy_io import read_policy
        from mimo_train.rollout.engine import Engine, EngineConfig

        self.spec, self.name, self.domain = spec, spec.name, spec.domain
        where = f"teacher {spec.name!r} (domain {spec.domain!r})"
        try:
            policy = read_policy(spec.checkpoint, mtp=False)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{where}: no checkpoint at {spec.checkpoint} ({e}); fix the path in the "
                                    f"teachers config or train the teacher first") from e
        except ValueError as e:
            raise ValueError(f"{where}: cannot load the checkpoint at {spec.checkpoint}: {e}") from e
        cfg = dataclasses.replace(policy.config, num_nextn_predict_layers=0)
        weights = {k: v for k, v in policy.weights.items() if ".mtp." not in k}
        self.engine = Engine(cfg, weights, engine_config or EngineConfig(max_batch=8))
        self.vocab_size, self.max_len = cfg.vocab_size, self.engine.max_len
        self.tokenizer_dir = policy.tokenizer

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return tokenizer_fingerprint(self.tokenizer_dir)

    def info(self) -> dict:
        return dict(name=self.name, vocab_size=self.vocab_size, tokenizer_fingerprint=self.tokenizer_fingerprint,
                    max_len=self.max_len)

    def score(self, prompts, responses, temperature: float = 1.0, top_k: int = 0) -> list[TokenScores]:
        return score_tokens(self.engine, prompts, responses, temperature, top_k)

    def logprobs(self, prompts, responses, temperature: float = 1.0) -> list[torch.Tensor]:
        return [s.logprobs for s in self.score(prompts, responses, temperature)]

    def close(self) -> None:
        pass


class RemoteTeacher:
    """Client of a tools/serve_teacher.py server. Connection refused, timeouts and 5xx are
    retried with exponential backoff, then raise TeacherUnavailable; a 400 (our request was bad)
    raises ValueError at once, since asking again would not help. Top-k scores come back as the
    in-process teacher's, split over as many requests as the server's per-request limit needs."""

    def __init__(self, spec: TeacherSpec, timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 0.5):
        if not spec.server:
            raise ValueError(f"teacher {spec.name!r}: RemoteTeacher needs spec.server (http://127.0.0.1:PORT)")
        self.spec, self.name, self.domain = spec, spec.name, spec.domain
        self.url = spec.server.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.tokenizer_dir = None  # the server's; compared through the fingerprint
        info = self.info()
        self.vocab_size, self.max_len = int(info["vocab_size"]), int(info["max_len"])
        self.tokenizer_fingerprint = info.get("tokenizer_fingerprint")
        # None: a server from before top_k (it refuses top_k with a 400, which says so).
        self.max_top_numbers = info.get("max_top_numbers")

    def info(self) -> dict:
        return self._call("GET", "/info")

    def logprobs(self, prompts, responses, temperature: float = 1.0) -> list[torch.Tensor]:
        return [s.logprobs for s in self.score(prompts, responses, temperature)]

    def score(self, prompts, responses, temperature: float = 1.0, top_k: int = 0) -> list[TokenScores]:
        prompts, responses = _lists(prompts), _lists(responses)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"teacher {self.name!r}: top_k must be an int >= 0, got {top_k!r}")
        if len(prompts) != len(responses):  # the server says so too, but the split below needs pairs
            raise ValueError(f"teacher {self.name!r}: {len(prompts)} prompts but {len(responses)} responses")
        out = []
        for rows in self._requests(responses, top_k):
            body = {"prompts": [prompts[i] for i in rows], "responses": [responses[i] for i in rows],
                    "temperature": float(temperature)}
            if top_k:  # only then: a server from before top_k still answers the sampled tokens' log-probs
                body["top_k"] = top_k
            answer = self._call("POST", "/logprobs", body)
            for j, lp in enumerate(answer["logprobs"]):
                n = len(lp)
                if top_k:
                    ids = torch.tensor(answer["top_ids"][j], dtype=torch.long).reshape(n, top_k)
                    top = torch.tensor(answer["top_logprobs"][j], dtype=torch.float32).reshape(n, top_k)
                else:
                    ids, top = torch.zeros(n, 0, dtype=torch.long), torch.zeros(n, 0)
                out.append(TokenScores(torch.tensor(lp, dtype=torch.float32), ids, top))
        return out

    def _requests(self, responses: list[list[int]], top_k: int) -> list[list[int]]:
        """Consecutive runs of pair indices, each within the server's top-k entries per request
        (tokens x top_k); everything in one request when there is no limit to respect."""
        limit = self.max_top_numbers
        if not top_k or not limit:
            return [list(range(len(responses)))]
        runs, run, used = [], [], 0
        for i, r in enumerate(responses):
            need = len(r) * top_k
            if need > limit:
                raise ValueError(f"teacher {self.name!r}: response {i} has {len(r)} tokens x top_k={top_k} = {need} "
                                 f"top-k entries, over the server's limit of {limit} per request: lower top_k or "
                                 f"start tools/serve_teacher.py with --max-top-numbers {need} or more")
            if run and used + need > limit:
                runs.append(run)
                run, used = [], 0
            run.append(i)
            used += need
        return runs + [run] if run else runs

    def close(self) -> None:  # the server is the user's process, not ours
        pass

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        from mimo_train.rollout import http_json

        try:
            return http_json.request(self.url + path, method, body, timeout_s=self.timeout_s, retries=self.retries,
                                backoff_s=self.backoff_s)
        except http_json.Refused as e:  # the server answers errors in plain text
            raise ValueError(f"teacher {self.name!r} at {self.url} refused the request "
                             f"(HTTP {e.code}): {e.message}") from None
        except http_json.Unavailable as e:
            raise TeacherUnavailable(
                f"teacher {self.name!r} (domain {self.domain!r}) at {self.url}{path} did not answer after {e.attempts} "
                f"attempts (timeout {self.timeout_s}s each); last error: {e.last}. Start it with "
                f"`python tools/serve_teacher.py --ckpt {self.spec.checkpoint} --port PORT --name {self.name}` "
                f"or drop `server` from the teacher's config to run it in-process") from None


Teacher = InProcessTeacher | RemoteTeacher


def make_teacher(spec: TeacherSpec, *, engine_config=None, timeout_s: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.5) -> Teacher:
    """RemoteTeacher when spec.server is set, else InProcessTeacher."""
    if spec.server:
        return RemoteTeacher(spec, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
    return InProcessTeacher(spec, engine_config)


# ---- compatibility and routing -----------------------------------------------------------------
def _describe(t) -> str:
    return f"teacher {t.name!r} (domain {t.domain!r}, {getattr(t, 'url', None) or t.spec.checkpoint})"


def check_compatible(student_vocab_size: int, student_tokenizer_dir, teachers) -> None:
    """TeacherMismatch if a teacher's vocabulary size or tokenizer differs from the student's.
    Tokenizers are compared by fingerprint when both sides know theirs; else sizes only."""
    teachers = list(teachers.values() if isinstance(teachers, Mapping) else teachers)
    student_fp = tokenizer_fingerprint(student_tokenizer_dir)
    for t in teachers:
        if t.vocab_size is not None and t.vocab_size != student_vocab_size:  # None: a server that does not say
            raise TeacherMismatch(f"{_describe(t)} has vocab size {t.vocab_size} but the student has "
                                  f"{student_vocab_size}: MOPD compares log-probs of the same token ids, so a "
                                  f"teacher must share the student's vocabulary")
        teacher_fp = t.tokenizer_fingerprint
        if student_fp and teacher_fp and student_fp != teacher_fp:
            theirs = t.tokenizer_dir or t.url
            raise TeacherMismatch(f"{_describe(t)} uses a different tokenizer than the student: teacher "
                                  f"{theirs} (fingerprint {teacher_fp}) vs student {student_tokenizer_dir} "
                                  f"(fingerprint {student_fp}); the same ids would mean different text")


def by_domain(teachers: Iterable) -> dict[str, Teacher]:
    """{domain: teacher}; ValueError if two teachers claim one domain (one teacher per prompt)."""
    out: dict = {}
    for t in teachers:
        if t.domain in out:
            raise ValueError(f"domain {t.domain!r} has two teachers ({out[t.domain].name!r}, {t.name!r}): "
                             f"MOPD scores each prompt with exactly one teacher")
        out[t.domain] = t
    return out


def check_domains(rows_domains: Sequence, teachers, field: str = "domain") -> None:
    """ValueError for data rows without a domain (None / "") or whose domain has no teacher.
    rows_domains holds each row's domain, or the rows themselves (dicts)."""
    teachers = teachers if isinstance(teachers, Mapping) else by_domain(teachers)
    domains = [r.get(field) if isinstance(r, Mapping) else r for r in rows_domains]
    missing = [i for i, d in enumerate(domains) if d is None or d == ""]
    if missing:
        raise ValueError(f"data row {missing[0]} has no {field!r} field: MOPD routes each prompt to its "
                         f"domain's teacher ({len(missing)} rows lack it, first: {missing[:10]})")
    orphans = sorted({d for d in domains if d not in teachers})
    if orphans:
        counts = {d: domains.count(d) for d in orphans}
        raise ValueError(f"no teacher for domain(s) {counts} (rows per domain); teachers cover "
                         f"{sorted(teachers)}: add a teacher for each domain or drop those rows")


def route(rows_domains: Sequence, teachers) -> list[tuple[Teacher, list[int]]]:
    """Group row indices by their domain's teacher: [(teacher, rows)], in order of first row,
    so each teacher scores its rows in one call. Raises as check_domains does."""
    teachers = teachers if isinstance(teachers, Mapping) else by_domain(teachers)
    check_domains(rows_domains, teachers)
    groups: dict[str, list[int]] = {}
    for i, d in enumerate(rows_domains):
        groups.setdefault(d.get("domain") if isinstance(d, Mapping) else d, []).append(i)
    return [(teachers[d], rows) for d, rows in groups.items()]

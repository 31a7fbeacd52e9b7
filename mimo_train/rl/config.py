"""RL settings (recipes grpo and mopd): rollouts, the objective, teachers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ALGORITHMS = ("grpo", "mopd")
LOSSES = ("sampled", "full", "topk")  # rl.distill_loss (mimo_train.rl.distill)
BACKENDS = ("native", "vllm")


class RLConfigError(ValueError):
    pass


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise RLConfigError(message)


@dataclass
class TeacherConfig:
    name: str = ""
    domain: str = ""  # the prompts of this domain (data row field `domain`) go to this teacher
    checkpoint: str = ""  # training checkpoint dir or serving dir
    server: str | None = None  # http://127.0.0.1:PORT of `tools/serve_teacher.py` (or of vLLM); null: in-process
    vllm: bool = False  # served by vLLM: at `server`, or (null) on a server the run starts (docs/vllm.md)
    tensor_parallel: int = 1  # of the vLLM server the run starts for this teacher


@dataclass
class RLConfig:
    algorithm: str = "grpo"
    prompts: str = "data/synthetic_sft/train.jsonl"  # rows with `domain` and `prompt` (file or dir)
    domains: list[str] = field(default_factory=list)  # only these domains' prompts (empty: all)
    prompts_per_step: int = 16
    group_size: int = 8  # samples per prompt: the GRPO group
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0  # must stay 1 (see validate)
    # GRPO: PPO-clipped ratio to the rollout policy, optional KL (k3) to a frozen reference.
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    reference: str | None = None  # checkpoint of the KL reference; default: checkpoint.load
    normalize_std: bool = True
    # MOPD: advantage = (log pi_teacher - log pi_student) + alpha * outcome advantage.
    alpha: float = 0.0
    # How the teacher's signal enters the loss (rl/distill.py, docs/rl.md): sampled (the report's
    # estimator on the sampled token), full (exact KL to the teacher over the vocabulary; the
    # teacher sends every token's log-prob), topk (the KL's terms over the teacher's top
    # distill_topk tokens, which it sends with the sampled tokens' log-probs).
    distill_loss: str = "sampled"
    distill_topk: int = 16
    teachers: list[TeacherConfig] = field(default_factory=list)
    teacher_timeout_s: float = 60.0
    teacher_retries: int = 3
    # Train/inference mismatch: tokens whose pi_train / pi_rollout leaves [is_low, is_high] are
    # dropped from the loss (MOPD; for GRPO the fraction is logged only).
    is_low: float = 0.5
    is_high: float = 2.0
    routing_replay: bool = True  # replay the engine's expert choices in the training forward
    # Rollout engine.
    # MTP draft depth K: 0..the model's MTP layers; null: all of them; auto: chosen every decode
    # step by measured step cost x running acceptance (rollout/depth.py, our engine only). Every
    # choice samples the same distribution (speculative sampling is lossless), but auto's choices
    # follow this machine's timings, so the sampled tokens do too: runs that must repeat bit for
    # bit (kill -9 and resume included) use a fixed depth.
    spec_depth: Any = None
    engine_max_batch: int = 32

    @property
    def distill_domains(self) -> list[str]:
        """The teachers' domains, in the order per-domain distillation metrics are summed."""
        return sorted({t.domain for t in self.teachers})

    def teacher_top_k(self, vocab_size: int) -> int:
        """How many of its most likely tokens a teacher sends per position: 0 for sampled."""
        return {"sampled": 0, "topk": min(self.distill_topk, vocab_size), "full": vocab_size}[self.distill_loss]

    def validate(self, recipe: str) -> None:
        _need(self.algorithm in ALGORITHMS, f"rl.algorithm={self.algorithm!r}: use one of {', '.join(ALGORITHMS)}")
        _need(self.algorithm == recipe, f"recipe {recipe} needs rl.algorithm={recipe} (got {self.algorithm})")
        _need(self.prompts_per_step >= 1 and self.group_size >= 1, "rl.prompts_per_step and rl.group_size must be >= 1")
        _need(self.max_new_tokens >= 1, "rl.max_new_tokens must be >= 1")
        _need(self.temperature > 0, "rl.temperature must be > 0: on-policy RL samples (greedy has no log-probs to learn from)")
        # The engine reports the untruncated log-softmax: with top-p the sampled distribution
        # differs from it, and the importance weight pi_train / pi_rollout would be wrong.
        _need(self.top_p == 1, "rl.top_p must be 1: RL needs the log-probs of the distribution it samples from")
        _need(self.clip_low >= 0 and self.clip_high >= 0 and self.kl_coef >= 0, "rl: clip_low, clip_high, kl_coef must be >= 0")
        _need(0 <= self.is_low <= 1 <= self.is_high, "rl: need 0 <= is_low <= 1 <= is_high")
        _need(self.distill_loss in LOSSES, f"rl.distill_loss={self.distill_loss!r}: use one of {', '.join(LOSSES)}")
        _need(self.distill_loss == "sampled" or self.algorithm == "mopd",
              f"rl.distill_loss={self.distill_loss} distills from teachers: it needs rl.algorithm=mopd")
        _need(self.distill_topk >= 1, f"rl.distill_topk={self.distill_topk} must be >= 1")
        # full moves [response tokens x vocabulary] log-probs per step: in-process only (a served
        # teacher would send gigabytes of JSON at the release's 152k vocabulary; vLLM's
        # prompt_logprobs stop at max_logprobs).
        _need(self.distill_loss != "full" or not any(t.vllm or t.server for t in self.teachers),
              "rl.distill_loss=full needs every teacher in-process (its whole distribution at every token): use "
              "rl.distill_loss=topk with served or vLLM teachers")
        depth = self.spec_depth
        _need(depth is None or depth == "auto" or (isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0),
              f"rl.spec_depth={depth!r}: use an int >= 0 (draft depth K), null (every MTP layer) or auto")
        if self.algorithm == "mopd":
            _need(self.kl_coef == 0, "rl.kl_coef is a GRPO option: MOPD's advantage already is the (reverse) KL to the teacher")
            _need(bool(self.teachers), "recipe mopd needs rl.teachers: a list of {name, domain, checkpoint[, server]}")
            domains = [t.domain for t in self.teachers]
            dup = sorted({d for d in domains if domains.count(d) > 1})
            _need(not dup, f"rl.teachers: more than one teacher for domain(s) {dup}: MOPD routes each prompt to one teacher")
            for t in self.teachers:
                _need(bool(t.name and t.domain and t.checkpoint),
                      f"rl.teachers entry {t}: name, domain and checkpoint are all required")
                _need(t.tensor_parallel >= 1, f"rl.teachers entry {t.name!r}: tensor_parallel must be >= 1")
                # vLLM's prompt log-probs come from the raw logits, whatever the request's temperature.
                _need(not t.vllm or self.temperature == 1,
                      f"rl.teachers entry {t.name!r} is served by vLLM, which scores at temperature 1 only; the run "
                      f"samples at rl.temperature={self.temperature}: set rl.temperature=1 or drop `vllm` from it")


@dataclass
class VLLMConfig:
    """vLLM servers as the rollout backend (docs/vllm.md): started by the run on this machine,
    or given as URLs of servers a cluster launcher started."""

    urls: list[str] = field(default_factory=list)  # servers started elsewhere; empty: the run starts `servers`
    servers: int = 1  # each gets its share of the prompts (data-parallel rollout)
    tensor_parallel: int = 1  # per server
    expert_parallel: bool = False  # per server: experts spread over its tensor-parallel ranks
    python: str = ".venv-vllm/bin/python"  # vLLM's own environment (`make setup` builds it); relative: to the repo
    host: str = "127.0.0.1"
    port: int = 0  # the first server's port (the next ones follow); 0: free ports
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU (also the dtype weights travel in)
    kv_cache_gb: float = 0.25  # CPU servers: memory for the KV cache
    cpu_threads: int = 0  # CPU servers: OpenMP threads of each; 0: every core (not the trainer's OMP_NUM_THREADS)
    gpu_memory_utilization: float = 0.5  # GPU servers: the share of each GPU vLLM may take
    enforce_eager: bool = True  # no torch.compile / CUDA graphs (start-up in seconds, not minutes)
    pad_v_head: bool | None = None  # null: pad v heads when vLLM runs on CPU and v_head_dim != head_dim
    bucket_mb: float = 64.0  # weight streaming: the most any trainer rank holds beyond its weights
    transfer_host: str = "127.0.0.1"  # trainer rank 0's address as the servers' processes reach it
    transfer_timeout_s: float = 300.0
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    retries: int = 3  # per request, with exponential backoff, before the run stops with an error
    extra_args: list[str] = field(default_factory=list)  # appended to the vLLM command line

    def dtype_on(self, cuda: bool) -> str:
        return self.dtype if self.dtype != "auto" else ("bfloat16" if cuda else "float32")

    def geometry(self, cfg, cuda: bool):
        """How servers of `cfg` are shaped (`ServingGeometry`): pad_v_head, or what the device needs."""
        from mimo_train.rollout.vllm.server import ServingGeometry

        return ServingGeometry(self.pad_v_head) if self.pad_v_head is not None else \
            ServingGeometry.for_device(cfg, cuda=cuda)

    def server_spec(self, *, cuda: bool, **fields):
        """A `ServerSpec` with these process settings (the rollout's servers and the teachers'
        alike); `fields`: the rest of its fields (model, port, log, sizes, ...)."""
        from mimo_train.rollout.vllm.server import ServerSpec
        from mimo_train.training.config import ROOT

        python = Path(self.python)
        return ServerSpec(python=str(python if python.is_absolute() else ROOT / python), host=self.host,
                          dtype=self.dtype_on(cuda), kv_cache_bytes=None if cuda else int(self.kv_cache_gb * (1 << 30)),
                          gpu_memory_utilization=self.gpu_memory_utilization, enforce_eager=self.enforce_eager,
                          cpu_threads=self.cpu_threads, extra_args=list(self.extra_args), **fields)

    def validate(self) -> None:
        _need(self.servers >= 1 and self.tensor_parallel >= 1, "rollout.vllm: servers and tensor_parallel must be >= 1")
        _need(self.dtype in ("auto", "float32", "bfloat16", "float16"),
              f"rollout.vllm.dtype={self.dtype!r}: use auto, float32, bfloat16 or float16")
        _need(self.bucket_mb > 0 and self.kv_cache_gb > 0 and 0 < self.gpu_memory_utilization <= 1,
              "rollout.vllm: bucket_mb and kv_cache_gb must be > 0, gpu_memory_utilization in (0, 1]")
        _need(self.port == 0 or 1024 <= self.port < 65536, f"rollout.vllm.port={self.port}: use 0 (free ports) or 1024..65535")
        _need(self.retries >= 0, "rollout.vllm.retries must be >= 0")
        _need(self.cpu_threads >= 0, f"rollout.vllm.cpu_threads={self.cpu_threads}: use 0 (every core) or a thread count")
        for url in self.urls:
            _need(url.startswith(("http://", "https://")), f"rollout.vllm.urls: {url!r} is not an http(s):// URL")


@dataclass
class RolloutConfig:
    """Where RL samples come from: `native` (our engine in rank 0's process) or `vllm`."""

    backend: str = "native"
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def validate(self) -> None:
        _need(self.backend in BACKENDS, f"rollout.backend={self.backend!r}: use one of {', '.join(BACKENDS)}")
        if self.backend == "vllm":
            self.vllm.validate()

"""RL settings (recipes grpo and mopd): rollouts, the objective, teachers."""

from __future__ import annotations

from dataclasses import dataclass, field

ALGORITHMS = ("grpo", "mopd")


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
    server: str | None = None  # http://127.0.0.1:PORT of `tools/serve_teacher.py`; null: in-process


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
    teachers: list[TeacherConfig] = field(default_factory=list)
    teacher_timeout_s: float = 60.0
    teacher_retries: int = 3
    # Train/inference mismatch: tokens whose pi_train / pi_rollout leaves [is_low, is_high] are
    # dropped from the loss (MOPD; for GRPO the fraction is logged only).
    is_low: float = 0.5
    is_high: float = 2.0
    routing_replay: bool = True  # replay the engine's expert choices in the training forward
    # Rollout engine.
    spec_depth: int | None = None  # MTP draft depth K; null: every MTP layer
    engine_max_batch: int = 32

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
        _need(self.spec_depth is None or self.spec_depth >= 0, "rl.spec_depth must be >= 0 or null")
        if self.algorithm == "mopd":
            _need(self.kl_coef == 0, "rl.kl_coef is a GRPO option: MOPD's advantage already is the (reverse) KL to the teacher")
            _need(bool(self.teachers), "recipe mopd needs rl.teachers: a list of {name, domain, checkpoint[, server]}")
            domains = [t.domain for t in self.teachers]
            dup = sorted({d for d in domains if domains.count(d) > 1})
            _need(not dup, f"rl.teachers: more than one teacher for domain(s) {dup}: MOPD routes each prompt to one teacher")
            for t in self.teachers:
                _need(bool(t.name and t.domain and t.checkpoint),
                      f"rl.teachers entry {t}: name, domain and checkpoint are all required")

"""The RL run (recipes grpo and mopd): a thin loop over the trainer and a rollout backend.

    one step = prompts -> backend.generate (current policy, MTP drafts) -> rewards (checkers)
               [-> teacher log-probs on the student's tokens (MOPD)] -> advantages
               -> RLTrainer.train_rl_step -> backend.push_weights (every rank: a collective)

The backend (`rl/rollout_backend.py`, `rollout=native|vllm`) is our engine in rank 0's process or
vLLM servers. Rank 0 samples, owns the teachers and broadcasts the step's samples; every rank
trains on its data-parallel share. Prompts and sampling seeds are functions of (seed, step), so a
resumed run samples exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mimo_train.data.dataset import load_tokenizer
from mimo_train.data.sources import BadRows, load_rows
from mimo_train.data.tasks import score
from mimo_train.parallel.layout import Layout
from mimo_train.parallel.rank0 import on_rank0
from mimo_train.parallel.setup import init_distributed
from mimo_train.rl import batch as rl_batch
from mimo_train.rl.evaluate import prompt_ids, response_text
from mimo_train.rl.loss import group_advantages
from mimo_train.rl.trainer import RLTrainer, make_rl_trainer
from mimo_train.rl.rollout_backend import make_backend
from mimo_train.training import checkpoint
from mimo_train.training.config import RunConfig
from mimo_train.training.loop import _StopRequest, log_step, resume
from mimo_train.training.tracking import Tracker, plot_losses


class PromptSet:
    """The RL prompts (rows with `domain` and `prompt`); step s draws a fixed function of (seed, s)."""

    def __init__(self, path: str, domains: list[str], seed: int):
        try:
            rows = load_rows(path, ["domain", "prompt"], BadRows("error"))
        except ValueError as err:
            raise ValueError(f"rl.prompts: {err} (RL rows need `prompt`, and `domain`: rewards are checked and "
                             "MOPD teachers chosen by the row's domain)") from None
        if domains:
            rows = [r for r in rows if r[0] in domains]
        if not rows:
            raise ValueError(f"rl.prompts={path}: no rows" + (f" of domains {domains}" if domains else ""))
        self.rows, self.seed = rows, seed
        self.domains = sorted({d for d, _ in rows})

    def draw(self, step: int, n: int) -> list[tuple[str, str]]:
        return random.Random(f"{self.seed}:{step}").sample(self.rows, n) if n <= len(self.rows) else \
            random.Random(f"{self.seed}:{step}").choices(self.rows, k=n)

    def state_dict(self) -> dict:  # the position is the step itself; kept for resume's interface
        return {"seed": self.seed, "rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rows") not in (None, len(self.rows)) or state.get("seed") not in (None, self.seed):
            raise checkpoint.CheckpointError(
                f"rl.prompts / train.seed now give {len(self.rows)} rows and seed {self.seed}; the checkpoint was "
                f"trained on {state.get('rows')} rows with seed {state.get('seed')}: resume with the same prompts and seed")

    def longest(self, tokenizer) -> int:
        return max(len(prompt_ids(tokenizer, p)) for _, p in self.rows)


def teacher_set(config: RunConfig) -> list[dict]:
    return [dataclasses.asdict(t) for t in config.rl.teachers] if config.rl.algorithm == "mopd" else []


def _teacher_key(t: dict) -> tuple:
    return (t["domain"], t["name"], str(Path(t["checkpoint"]).resolve()))


def check_resume(config: RunConfig) -> None:
    """The checkpoint to resume must be this recipe's, with the same teachers (by domain, name
    and resolved checkpoint path)."""
    path = checkpoint.latest(config.checkpoint_dir) if config.checkpoint.resume else None
    if path is None:
        return
    state = checkpoint.read_state(path)
    if state.get("recipe") != config.recipe:
        raise checkpoint.CheckpointError(
            f"{path} was saved by recipe {state.get('recipe')!r}, not {config.recipe!r}: start from it with "
            "checkpoint.load=... and a new checkpoint.dir / logging.run_dir")
    mine = sorted(_teacher_key(t) for t in teacher_set(config))
    theirs = sorted(_teacher_key(t) for t in state.get("teachers") or [])
    if theirs != mine:
        raise checkpoint.CheckpointError(
            f"{path} was trained with teachers {theirs}; this run declares {mine}. Resume with the same "
            "rl.teachers, or start a new run (checkpoint.dir / logging.run_dir)")


def rollout_max_len(config: RunConfig, prompts: PromptSet, tokenizer) -> int:
    """Prompt + response tokens of the longest request the run can make (caches are sized by it)."""
    max_len = prompts.longest(tokenizer) + config.rl.max_new_tokens + 1
    if max_len > config.model.max_position_embeddings:
        raise ValueError(f"the longest RL prompt + rl.max_new_tokens = {max_len} tokens exceeds the model's "
                         f"max_position_embeddings={config.model.max_position_embeddings}: shorten the prompts or "
                         "max_new_tokens")
    return max_len


class Rollout:
    """Rank 0's side: samples from the rollout backend, teachers, rewards and advantages."""

    def __init__(self, config: RunConfig, backend, tokenizer, prompts: PromptSet, teachers: dict):
        from mimo_train.rollout.api import SamplingParams

        rl = config.rl
        self.config, self.rl, self.tokenizer, self.prompts, self.backend = config, rl, tokenizer, prompts, backend
        self.eos = tokenizer.eos_token_id
        self.params = lambda seed: SamplingParams(  # noqa: E731
            temperature=rl.temperature, top_p=rl.top_p, max_new_tokens=rl.max_new_tokens,
            stop_token_ids=(self.eos,), n=rl.group_size, seed=seed, return_routed_experts=True)
        self.teachers = teachers.get("domains", {})
        self.reference = teachers.get("reference")

    def collect(self, step: int) -> tuple[list[rl_batch.Sample], dict]:
        rl, seed = self.rl, self.config.train.seed
        rows = self.prompts.draw(step, rl.prompts_per_step)
        prompts = [prompt_ids(self.tokenizer, p) for _, p in rows]  # as training documents begin
        t0 = time.time()
        params = [self.params(random.Random(f"{seed}:{step}:{i}").getrandbits(31)) for i in range(len(rows))]
        completions, stats = self.backend.generate(prompts, params)
        t_rollout = time.time() - t0
        samples, rewards = [], []
        for c in completions:
            domain, prompt = rows[c.prompt_index]
            reward = score(domain, prompt, response_text(self.tokenizer, c.tokens))  # as evaluation reads it
            rewards.append(reward)
            samples.append(rl_batch.Sample(c.prompt, list(c.tokens), list(c.logprobs), domain, reward,
                                           routed=c.routed_experts))
        outcome = group_advantages(torch.tensor(rewards, dtype=torch.float64), rl.group_size,
                                   normalize_std=rl.normalize_std)
        for s, a in zip(samples, outcome.tolist()):
            s.outcome_advantage = a
        t1 = time.time()
        metrics = self._score(samples)
        metrics.update({"time/rollout": t_rollout, "time/teacher": time.time() - t1,
                        "rollout/tokens_per_s": stats.tokens_per_s, "rollout/accept_length": stats.mean_accept_length,
                        "rollout/occupancy": stats.occupancy, "rollout/policy_version": self.backend.version,
                        "rollout/response_length": sum(len(s.response) for s in samples) / len(samples),
                        "reward/mean": sum(rewards) / len(rewards)})
        for j, a in enumerate(stats.acceptance_per_position):
            metrics[f"rollout/acceptance_{j}"] = a
        steps = sum(stats.depth_steps.values())
        if steps:  # the K each decode step drafted (rl.spec_depth=auto moves it)
            metrics["rollout/mean_depth"] = sum(k * n for k, n in stats.depth_steps.items()) / steps
        metrics.update(draft_metrics([rows[c.prompt_index][0] for c in completions], [c.drafts for c in completions]))
        for domain in sorted({s.domain for s in samples}):
            mine = [s.reward for s in samples if s.domain == domain]
            metrics[f"reward/{domain}"] = sum(mine) / len(mine)
        return samples, metrics

    def _score(self, samples: list[rl_batch.Sample]) -> dict:
        return score_samples(samples, self.teachers, self.reference, self.rl.temperature,
                             top_k=self.rl.teacher_top_k(self.config.model.vocab_size))


def draft_metrics(domains: list[str], counts: list) -> dict:
    """rollout/accept_length/<domain> and rollout/acceptance_<j>/<domain> from the samples'
    per-request draft counts (`rollout.api.DraftCounts`: only tokens that reached the sample),
    pooled over each domain's verify steps. Samples without counts (the vLLM backend reports
    drafting only server-wide) give no per-domain figure, rather than a made-up one."""
    from mimo_train.rollout.api import DraftCounts

    by_domain: dict[str, list] = {}
    for domain, c in zip(domains, counts):
        if c is not None:
            by_domain.setdefault(domain, []).append(c)
    metrics = {}
    for domain, mine in sorted(by_domain.items()):
        total = DraftCounts.total(mine)
        if total.steps:
            metrics[f"rollout/accept_length/{domain}"] = total.accept_length
        for j, a in enumerate(total.acceptance_per_position):
            metrics[f"rollout/acceptance_{j}/{domain}"] = a
    return metrics


def score_samples(samples: list[rl_batch.Sample], teachers: dict, reference, temperature: float,
                  top_k: int = 0) -> dict:
    """Set each sample's teacher_logprobs from its domain's teacher (MOPD: every sample, else
    ValueError), with `top_k` > 0 also the teacher's top-k tokens per position, and ref_logprobs
    from the reference (GRPO's KL); teacher_kl/<domain> metrics (the sampled tokens' gap)."""
    from mimo_train.rl.teachers import route

    metrics = {}
    if reference is not None:
        for s, lp in zip(samples, reference.logprobs([s.prompt for s in samples], [s.response for s in samples],
                                                     temperature=temperature)):
            s.ref_logprobs = lp.tolist()
    if not teachers:
        return metrics
    # One call per teacher with all its samples; a sample whose domain has no teacher is an error
    # (zeros would read as a teacher certain of nothing: a silent, wrong advantage).
    for teacher, rows in route([s.domain for s in samples], teachers):
        mine = [samples[i] for i in rows]
        scored = teacher.score([s.prompt for s in mine], [s.response for s in mine], temperature=temperature,
                               top_k=top_k)
        gap, tokens = 0.0, 0
        for s, scores in zip(mine, scored):
            s.teacher_logprobs = scores.logprobs.tolist()
            if top_k:
                s.teacher_top_ids, s.teacher_top_logprobs = scores.top_ids, scores.top_logprobs
            gap += sum(r - t for r, t in zip(s.rollout_logprobs, s.teacher_logprobs))
            tokens += len(s.response)
        metrics[f"teacher_kl/{teacher.domain}"] = gap / max(tokens, 1)  # E_student[log mu - log pi_teacher] per token
    return metrics


def load_teachers(config: RunConfig, prompts: PromptSet, max_len: int) -> dict:
    """MOPD: the teacher of every domain the prompts hold, checked against the student's
    vocabulary and tokenizer; GRPO with a KL penalty: the frozen reference. Loaded before the
    trainer is built, so a wrong teacher costs seconds, not a model build. vLLM teachers' servers
    are in out["servers"] (`close_teachers` stops them)."""
    from mimo_train.rl.teachers import TeacherSpec, check_compatible, check_domains, make_teacher
    from mimo_train.rl.vllm_teacher import VLLMTeachers

    rl, out = config.rl, {}
    try:
        if rl.algorithm == "mopd":
            specs = [(TeacherSpec(t.name, t.domain, t.checkpoint, t.server, t.vllm), t.tensor_parallel)
                     for t in rl.teachers]
            served = [(s, tp) for s, tp in specs if s.vllm]
            if served:
                out["servers"] = VLLMTeachers(config, served, max_len, top_k=rl.teacher_top_k(config.model.vocab_size))
            teachers = {s.domain: out["servers"].teachers[s.domain] if s.vllm else
                        make_teacher(s, timeout_s=rl.teacher_timeout_s, retries=rl.teacher_retries) for s, _ in specs}
            check_compatible(config.model.vocab_size, config.data.tokenizer, list(teachers.values()))
            check_domains(prompts.domains, teachers)
            out["domains"] = teachers
        if rl.algorithm == "grpo" and rl.kl_coef > 0:
            ref = rl.reference or config.checkpoint.load
            if not ref:
                raise ValueError("rl.kl_coef > 0 needs a reference: set rl.reference or checkpoint.load")
            out["reference"] = make_teacher(TeacherSpec("reference", "*", str(ref)))
    except BaseException:
        close_teachers(out)
        raise
    return out


def close_teachers(teachers: dict | None) -> None:
    """Stop the vLLM servers started for teachers (rank 0; nothing elsewhere)."""
    if teachers and "servers" in teachers:
        teachers["servers"].close()


def run_rl(config: RunConfig, layout: Layout) -> dict:
    init_distributed(layout.tp, layout.pp, layout.ep, layout.vpp, seed=config.train.seed)
    rl = config.rl
    check_resume(config)
    prompts = PromptSet(rl.prompts, rl.domains, config.train.seed)
    tokenizer = load_tokenizer(config.data.tokenizer)
    max_len = rollout_max_len(config, prompts, tokenizer)
    teachers, backend = None, None
    try:
        teachers = on_rank0(lambda: load_teachers(config, prompts, max_len), share=False) or {}
        # Before the trainer: a server that cannot start, or serves another model, costs no model build.
        backend = make_backend(config, max_len)
        trainer = make_rl_trainer(config, layout, rl)
        resumed = resume(trainer, prompts, config, layout)
        backend.push_weights(trainer.model, version=trainer.step)
        rollout = on_rank0(lambda: Rollout(config, backend, tokenizer, prompts, teachers), share=False)
        return _train(config, layout, trainer, backend, rollout, prompts, tokenizer, resumed)
    finally:
        if backend is not None:
            backend.close()
        close_teachers(teachers)


def _train(config: RunConfig, layout: Layout, trainer: RLTrainer, backend, rollout, prompts: PromptSet, tokenizer,
           resumed) -> dict:
    rank0 = dist.get_rank() == 0
    tracker = Tracker(config.run_dir, enabled=rank0, total_steps=config.train.steps, start_step=trainer.step,
                      config=config.to_dict(), wandb_project=config.logging.wandb_project,
                      wandb_mode=config.logging.wandb_mode, progress=config.logging.progress, name=config.recipe)
    if resumed:
        tracker.message(f"resumed from {resumed} at step {trainer.step}")
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    multiple = layout.tp
    stop = _StopRequest()

    def save() -> None:
        state = {**trainer.state(), "data": prompts.state_dict(), "model": dataclasses.asdict(config.model),
                 "layout": dataclasses.asdict(layout), "recipe": config.recipe, "teachers": teacher_set(config),
                 "tokenizer": str(Path(config.data.tokenizer).resolve())}
        final = trainer.save_checkpoint(config.checkpoint_dir, state, config.checkpoint.keep_last)
        tracker.message(f"saved {final}")

    metrics: dict = {}
    try:
        stop_at = config.train.stop_at
        last = config.train.steps if stop_at is None else min(config.train.steps, stop_at)
        while trainer.step < last:
            t0 = time.time()
            # Rank 0's stop signal decides for every rank, so all ranks leave the loop together.
            collected = on_rank0(lambda: None if stop.requested else rollout.collect(trainer.step))
            if collected is None:
                break
            samples, rollout_metrics = collected
            per_rank = len(samples) // dp
            mine = samples[dp_rank * per_rank:(dp_rank + 1) * per_rank]
            length = rl_batch.padded_length(samples, config.train.micro_batch, multiple)
            mbs = rl_batch.micro_batches(mine, config.train.micro_batch, num_sequences=len(samples), length=length,
                                         pad_id=tokenizer.pad_token_id or 0, num_experts=config.model.n_routed_experts,
                                         domains=config.rl.distill_domains if config.rl.distill_loss != "sampled" else None)
            result = trainer.train_rl_step(mbs)
            t1 = time.time()
            sync = backend.push_weights(trainer.model, version=trainer.step)
            metrics = {**rollout_metrics, **result.metrics, **sync, "time/sync": time.time() - t1,
                       "time/step": time.time() - t0,
                       "rl/tokens": sum(s.length for s in samples)}
            log_step(trainer, config, tracker, metrics, result.skipped)
            if config.checkpoint.every and trainer.step % config.checkpoint.every == 0:
                save()
        save()
    finally:
        stop.restore()
        tracker.close()
    if rank0 and config.logging.plot and (config.run_dir / "metrics.jsonl").exists():
        plot_losses(config.run_dir)
        plot_rewards(config.run_dir)
    return metrics


def plot_rewards(run_dir: Path) -> Path:
    """reward/* and teacher_kl/* curves -> rewards.png next to metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mimo_train.training.tracking import read_metrics

    rows = read_metrics(run_dir)
    groups = [("reward/", "reward"), ("teacher_kl/", "teacher KL (nats/token)"), ("rollout/accept_length", "accept length")]
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.5))
    for ax, (prefix, title) in zip(axes, groups):
        keys = sorted({k for r in rows for k in r if k.startswith(prefix)})
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key.removeprefix(prefix) or key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if keys:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(run_dir) / "rewards.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

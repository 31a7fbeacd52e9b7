"""Tiny RL runs through `mimo_train/run.py`, as users start them."""

from __future__ import annotations

from pathlib import Path

DOMAINS = ("arithmetic", "reverse", "sort")


def teachers_override(teacher: Path, domains=DOMAINS, server: str | None = None, vllm: bool = False) -> str:
    extra = (f",server:'{server}'" if server else "") + (",vllm:true" if vllm else "")
    items = ",".join(f"{{name:t_{d},domain:{d},checkpoint:'{teacher}'{extra}}}" for d in domains)
    return f"rl.teachers=[{items}]"


def init_args(data: Path, run_dir: Path, seed: int, model: tuple[str, ...] = ("model=tiny", "model.num_key_value_heads=2")
              ) -> list[str]:
    """Save the tiny model's initial weights (seeded) without training: a student or a teacher."""
    return ["recipe=sft", *model, f"train.seed={seed}", "train.stop_at=0",
            "train.steps=2", "optim.warmup_steps=0", f"data.path={data}/train.jsonl", f"data.tokenizer={data}/tokenizer",
            "data.seq_len=64", f"logging.run_dir={run_dir}", "logging.progress=false", "logging.plot=false"]


def mopd_args(data: Path, run_dir: Path, student: Path, teacher: Path, *extra: str, steps: int = 2) -> list[str]:
    """MOPD on the tiny model: 4 prompts x 2 samples per step, 6 new tokens, all 3 domains."""
    from tests.rollout.vllm_utils import SERVER_THREADS_ARG  # for the tests whose teachers are vLLM servers

    return ["recipe=mopd", "model=tiny", "model.num_key_value_heads=2", f"train.steps={steps}",
            "train.global_batch=8", "train.micro_batch=2", "rl.prompts_per_step=4", "rl.group_size=2",
            "rl.max_new_tokens=6", "rl.alpha=0.5", f"rl.prompts={data}/train.jsonl", f"data.tokenizer={data}/tokenizer",
            f"checkpoint.load={student}", teachers_override(teacher), "optim.lr=1e-3", "optim.min_lr=1e-3",
            f"logging.run_dir={run_dir}", "logging.progress=false", "logging.plot=false", SERVER_THREADS_ARG, *extra]


def vllm_args(recipe: str, data: Path, run_dir: Path, student: Path, *extra: str, teacher: Path | None = None,
              url: str | None = None, steps: int = 2) -> list[str]:
    """GRPO or MOPD on the head-32 tiny model (vLLM's CPU attention size) with rollout=vllm: the
    run starts its own server, or uses `url`. 4 prompts x 2 samples, 6 new tokens at T=0.7 (the
    log-probs must be those after temperature); vLLM on CPU neither drafts nor reports routing."""
    from tests.rollout.vllm_utils import SERVER_THREADS_ARG, TINY32_ARGS

    where = [f"rollout.vllm.urls=['{url}']"] if url else ["rollout.vllm.kv_cache_gb=0.25"]
    teachers = [teachers_override(teacher)] if teacher else []
    return [f"recipe={recipe}", "rollout=vllm", *TINY32_ARGS, f"train.steps={steps}", "train.global_batch=8",
            "train.micro_batch=4", "rl.prompts_per_step=4", "rl.group_size=2", "rl.max_new_tokens=6",
            "rl.temperature=0.7", "rl.spec_depth=0", "rl.routing_replay=false", f"rl.prompts={data}/train.jsonl",
            f"data.tokenizer={data}/tokenizer", f"checkpoint.load={student}", *teachers, "optim.lr=1e-3",
            "optim.min_lr=1e-3", f"logging.run_dir={run_dir}", "logging.progress=false", "logging.plot=false",
            SERVER_THREADS_ARG, *where, *extra]

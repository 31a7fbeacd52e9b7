"""Tiny RL runs through `mimo_train/run.py`, as users start them."""

from __future__ import annotations

from pathlib import Path

DOMAINS = ("arithmetic", "reverse", "sort")


def teachers_override(teacher: Path, domains=DOMAINS, server: str | None = None) -> str:
    extra = f",server:'{server}'" if server else ""
    items = ",".join(f"{{name:t_{d},domain:{d},checkpoint:'{teacher}'{extra}}}" for d in domains)
    return f"rl.teachers=[{items}]"


def init_args(data: Path, run_dir: Path, seed: int) -> list[str]:
    """Save the tiny model's initial weights (seeded) without training: a student or a teacher."""
    return ["recipe=sft", "model=tiny", "model.num_key_value_heads=2", f"train.seed={seed}", "train.stop_at=0",
            "train.steps=2", "optim.warmup_steps=0", f"data.path={data}/train.jsonl", f"data.tokenizer={data}/tokenizer",
            "data.seq_len=64", f"logging.run_dir={run_dir}", "logging.progress=false", "logging.plot=false"]


def mopd_args(data: Path, run_dir: Path, student: Path, teacher: Path, *extra: str, steps: int = 2) -> list[str]:
    """MOPD on the tiny model: 4 prompts x 2 samples per step, 6 new tokens, all 3 domains."""
    return ["recipe=mopd", "model=tiny", "model.num_key_value_heads=2", f"train.steps={steps}",
            "train.global_batch=8", "train.micro_batch=2", "rl.prompts_per_step=4", "rl.group_size=2",
            "rl.max_new_tokens=6", "rl.alpha=0.5", f"rl.prompts={data}/train.jsonl", f"data.tokenizer={data}/tokenizer",
            f"checkpoint.load={student}", teachers_override(teacher), "optim.lr=1e-3", "optim.min_lr=1e-3",
            f"logging.run_dir={run_dir}", "logging.progress=false", "logging.plot=false", *extra]

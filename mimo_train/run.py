"""The one entry point for training runs.

    python mimo_train/run.py recipe=pretrain [Hydra overrides]
    torchrun --nproc-per-node 4 mimo_train/run.py recipe=pretrain parallel.tp=2 parallel.pp=2
    python mimo_train/run.py recipe=grpo checkpoint.load=runs/sft/checkpoints rl.domains=[sort]
    python mimo_train/run.py recipe=mopd checkpoint.load=runs/sft/checkpoints teachers=synthetic

Recipes are in recipes/, their building blocks in configs/. Every value is type-checked and
validated, and the parallel layout checked against the model, before any work starts.

A user error (bad config, layout, data, checkpoint, teacher) ends the run with one `error:`
line on every rank and exit code 2; MIMO_TRACEBACK=1 in the environment adds the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore", module="megatron")
    from mimo_train.parallel.layout import LayoutError, check_layout
    from mimo_train.parallel.rank0 import Rank0Failed, seen_by_every_rank
    from mimo_train.parallel.setup import join
    from mimo_train.rl.teachers import TeacherUnavailable
    from mimo_train.rollout.vllm.client import ServerUnavailable
    from mimo_train.rollout.vllm.server import ServerError
    from mimo_train.training.checkpoint import CheckpointError
    from mimo_train.training.config import ConfigError, load_config
    from mimo_train.training.loop import TooManySkippedSteps, run, world_size

    user_errors = (ConfigError, LayoutError, CheckpointError, TooManySkippedSteps, FileNotFoundError, ValueError,
                   TeacherUnavailable, ServerError, ServerUnavailable)
    try:
        config = load_config(argv)
        p = config.parallel
        layout = check_layout(config.model, world_size(), p.tp, p.pp, p.ep, p.vpp,
                              config.train.global_batch, config.train.micro_batch)
        join(p.timeout_minutes)
        if config.recipe in ("pretrain", "sft"):
            run(config, layout)
        elif config.recipe in ("grpo", "mopd"):
            from mimo_train.rl.loop import run_rl

            run_rl(config, layout)
        else:
            raise ConfigError(f"recipe {config.recipe!r} has no runner in this version")
    except Exception as err:
        line = error_line(err, user_errors, Rank0Failed)
        if line is None:
            raise  # a bug, not a user error: the traceback is the report
        report(f"error: {line}\n")
        if os.environ.get("MIMO_TRACEBACK") == "1":
            traceback.print_exc()
        if seen_by_every_rank(err):
            # torchrun ends the other ranks as soon as one exits: every rank reports, then all exit.
            sys.stderr.flush()
            import torch.distributed as dist

            dist.barrier()
        return 2
    return 0


def report(text: str) -> None:
    """Write `text` to stderr in one write(2): every rank shares torchrun's stderr pipe, and
    print's two writes (text, then newline) let two ranks' lines run together on one line (seen
    on CI). A pipe write under PIPE_BUF (4 KiB on Linux) is atomic; longer ones may interleave."""
    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stderr (pytest's capsys): no fd
        sys.stderr.write(text)
        return
    os.write(fd, text.encode())


def error_line(err: Exception, user_errors: tuple, rank0_failed: type) -> str | None:
    """The one line that reports `err`, or None when it is not a user error. A failure of rank
    0's work reaches the other ranks as `rank0_failed`: they print rank 0's line, so every rank
    says the same; an unexpected error there (rank 0 prints its traceback) is named as such."""
    if isinstance(err, rank0_failed):
        return str(err.original) if isinstance(err.original, user_errors) else f"rank 0 failed: {err}"
    return str(err) if isinstance(err, user_errors) else None


if __name__ == "__main__":  # the guard matters: checkpoint saving starts spawn-context workers
    sys.exit(main(sys.argv[1:]))

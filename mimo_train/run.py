"""The one entry point for training runs.

    python mimo_train/run.py recipe=pretrain [Hydra overrides]
    torchrun --nproc-per-node 4 mimo_train/run.py recipe=pretrain parallel.tp=2 parallel.pp=2
    python mimo_train/run.py recipe=grpo checkpoint.load=runs/sft/checkpoints rl.domains=[sort]
    python mimo_train/run.py recipe=mopd checkpoint.load=runs/sft/checkpoints teachers=synthetic

Recipes are in recipes/, their building blocks in configs/. Every value is type-checked and
validated, and the parallel layout checked against the model, before any work starts.
"""

from __future__ import annotations

import sys
import warnings


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore", module="megatron")
    from mimo_train.parallel.layout import LayoutError, check_layout
    from mimo_train.rl.teachers import TeacherUnavailable
    from mimo_train.rollout.vllm.client import ServerUnavailable
    from mimo_train.rollout.vllm.server import ServerError
    from mimo_train.training.checkpoint import CheckpointError
    from mimo_train.training.config import ConfigError, load_config
    from mimo_train.training.loop import TooManySkippedSteps, run, world_size

    try:
        config = load_config(argv)
        p = config.parallel
        layout = check_layout(config.model, world_size(), p.tp, p.pp, p.ep, p.vpp,
                              config.train.global_batch, config.train.micro_batch)
        if config.recipe in ("pretrain", "sft"):
            run(config, layout)
        elif config.recipe in ("grpo", "mopd"):
            from mimo_train.rl.loop import run_rl

            run_rl(config, layout)
        else:
            raise ConfigError(f"recipe {config.recipe!r} has no runner in this version")
    except (ConfigError, LayoutError, CheckpointError, TooManySkippedSteps, FileNotFoundError, ValueError,
            TeacherUnavailable, ServerError, ServerUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # the guard matters: checkpoint saving starts spawn-context workers
    sys.exit(main(sys.argv[1:]))

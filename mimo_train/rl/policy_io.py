"""Read a policy from disk for forward-only use (rollouts, teachers, evaluation).

Two sources, told apart by their files: a training checkpoint (a run's `checkpoints/` dir with
`latest`, or one `iter_*` dir; any TP/PP/EP layout, read in one process without megatron's
processes) or a serving-format directory (what `tools/export.py` writes, or a transformers
`save_pretrained` dir). Both end as tensors under the serving names the rollout engine loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mimo_train.model.config import ModelConfig


@dataclass
class Policy:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # serving names, fp32
    tokenizer: Path | None  # the tokenizer directory recorded with the weights, if any
    source: str  # "checkpoint" or "serving"
    path: Path


def is_training_checkpoint(path: Path) -> bool:
    return (path / "latest").exists() or (path / ".metadata").exists()


def read_policy(path: str | Path, *, mtp: bool = True) -> Policy:
    """The weights and config at `path`. Raises FileNotFoundError for a missing path and
    ConvertError (a ValueError) for an incomplete or inconsistent checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no policy at {path}: expected a training checkpoint dir or a serving-format dir")
    if is_training_checkpoint(path):
        return _from_checkpoint(path, mtp)
    from mimo_train.model.load import config_for_weights, read_weights

    weights = read_weights(path)
    if not mtp:
        weights = {k: v for k, v in weights.items() if ".mtp." not in k}
    tokenizer = path if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists() else None
    return Policy(config_for_weights(path, weights), weights, tokenizer, "serving", path)


def _from_checkpoint(path: Path, mtp: bool) -> Policy:
    from mimo_train.convert.dist_reader import DistCheckpoint
    from mimo_train.convert.exporter import _convert, check_against_config, model_config, plan

    ck = DistCheckpoint(path)
    cfg = model_config(ck)
    mtp = mtp and cfg.num_nextn_predict_layers > 0
    keys = check_against_config(ck, cfg, mtp)
    ck.check_files(keys)
    entries = plan(cfg, mtp=mtp, quantize=False)
    read = ck.read({(e.key, e.index): torch.float32 for e in entries})
    weights = {}
    for e in entries:
        weights.update(_convert(e, read[(e.key, e.index)], torch.float32, None))
    tokenizer = ck.state.get("tokenizer")
    return Policy(cfg, weights, Path(tokenizer) if tokenizer else None, "checkpoint", ck.path)


def load_engine(path: str | Path, config=None, **overrides):
    """A rollout `Engine` over the policy at `path` (EngineConfig from `config` / overrides)."""
    from mimo_train.rollout.engine import Engine, EngineConfig

    policy = read_policy(path)
    engine = Engine(policy.config, policy.weights, config or EngineConfig(**overrides))
    engine.policy_path, engine.tokenizer_dir = policy.path, policy.tokenizer
    return engine

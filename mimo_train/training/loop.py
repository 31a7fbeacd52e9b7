"""The pretrain / SFT run: set up, resume, step, track, checkpoint, finish.

Stops cleanly (with a checkpoint) at the last step or on SIGTERM/SIGINT between steps (a signal
to any rank stops every rank at the same step); stops without saving after too many
non-finite steps, so the last good checkpoint stays `latest`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mimo_train.data.dataset import DataLoader, PackedDataset
from mimo_train.model.config import ModelConfig
from mimo_train.parallel.layout import Layout
from mimo_train.parallel.setup import init_distributed
from mimo_train.training import checkpoint
from mimo_train.training.config import RunConfig
from mimo_train.training.tracking import Tracker, plot_losses
from mimo_train.training.trainer import TooManySkippedSteps, Trainer, make_trainer


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def stop_agreed(requested: bool, device: torch.device) -> bool:
    """Whether any rank was asked to stop. A signal reaches ranks at different moments; a rank
    leaving the loop alone would enter the final save's collectives while the others are in a
    step's, and the job would hang. One tiny all-reduce per step."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return requested
    flag = torch.tensor([float(requested)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _model_mismatch(saved: dict, current: dict) -> list[str]:
    # A field added since the checkpoint was saved (mtp_feed) reads as its default.
    saved = {**{f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING},
             **saved}
    return [f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def resume(trainer: Trainer, loader: DataLoader, config: RunConfig, layout: Layout) -> str | None:
    """Load `latest` (full state) or `checkpoint.load` (weights only). Returns what was loaded."""
    if not config.checkpoint.resume:
        checkpoint.check_fresh_start(config.checkpoint_dir)
    path = checkpoint.latest(config.checkpoint_dir) if config.checkpoint.resume else None
    full = path is not None
    if path is None and config.checkpoint.load:
        path = Path(config.checkpoint.load)
        if (path / "latest").exists():  # a checkpoint dir rather than one iter_* dir
            path = checkpoint.latest(path)
        if not path.exists():
            raise checkpoint.CheckpointError(f"checkpoint.load={config.checkpoint.load}: no such checkpoint")
    if path is None:
        return None
    state = checkpoint.read_state(path)
    full = full and not state.get("weights_only", False)
    diff = _model_mismatch(state["model"], dataclasses.asdict(config.model))
    if diff:
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was saved for a different model config ({'; '.join(diff)}); "
            "use the model config it was trained with, or a different checkpoint.dir")
    saved_ep, ep = (state.get("layout") or {}).get("ep", 1), layout.ep
    if full and (saved_ep > 1) != (ep > 1):
        # megatron-core builds a separate optimizer for the expert parameters only under expert
        # parallelism (a ChainedOptimizer): its state does not map onto one optimizer's, or back.
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was saved with parallel.ep={saved_ep} and this run has parallel.ep={ep}: "
            "optimizer state does not carry between EP=1 and EP>1 (megatron keeps the experts' optimizer "
            f"apart only under expert parallelism); resume with parallel.ep{'>1' if saved_ep > 1 else '=1'}, "
            "or start a new run from its weights with checkpoint.load")
    same_layout = state.get("layout") == dataclasses.asdict(layout)
    trainer.load_checkpoint(path, full=full, rng=full and same_layout)
    if full:
        trainer.load_state(state)
        loader.load_state_dict(state["data"])
    return str(path)


def log_step(trainer: Trainer, config: RunConfig, tracker: Tracker, metrics: dict, skipped: bool) -> None:
    """Log a step (every `logging.every`, and always a skipped one); past
    `train.max_skipped_steps` skipped steps, stop without saving so `latest` stays good."""
    if trainer.step % config.logging.every == 0 or skipped:
        tracker.log(trainer.step, metrics)
    if skipped:
        tracker.message(f"step {trainer.step}: non-finite loss or gradient, update skipped "
                        f"({trainer.skipped}/{config.train.max_skipped_steps} allowed)")
        if trainer.skipped > config.train.max_skipped_steps:
            raise TooManySkippedSteps(
                f"{trainer.skipped} steps had a non-finite loss or gradient (train.max_skipped_steps="
                f"{config.train.max_skipped_steps}); stopped without saving, the last checkpoint is intact")


def run(config: RunConfig, layout: Layout) -> dict:
    """Train; returns the last step's metrics (on every rank)."""
    init_distributed(layout.tp, layout.pp, layout.ep, layout.vpp, seed=config.train.seed)
    rank0 = dist.get_rank() == 0
    dataset = PackedDataset(config.data)
    loader = DataLoader(dataset, global_batch=config.train.global_batch, micro_batch=config.train.micro_batch,
                        dp_rank=parallel_state.get_data_parallel_rank(),
                        dp_size=parallel_state.get_data_parallel_world_size())
    trainer = make_trainer(config, layout)
    resumed = resume(trainer, loader, config, layout)
    tracker = Tracker(config.run_dir, enabled=rank0, total_steps=config.train.steps, start_step=trainer.step,
                      config=config.to_dict(), wandb_project=config.logging.wandb_project,
                      wandb_mode=config.logging.wandb_mode, progress=config.logging.progress,
                      name=f"{config.recipe}")
    if dataset.skipped:
        tracker.message(f"data: skipped {dataset.skipped} malformed rows (data.bad_rows=skip)")
    if resumed:
        tracker.message(f"resumed from {resumed} at step {trainer.step}")
    stop = _StopRequest()

    def save() -> None:
        state = {**trainer.state(), "data": loader.state_dict(), "model": dataclasses.asdict(config.model),
                 "layout": dataclasses.asdict(layout), "recipe": config.recipe,
                 # Readers of the checkpoint (export, teachers, evaluation) find the tokenizer here.
                 "tokenizer": str(Path(config.data.tokenizer).resolve())}
        final = trainer.save_checkpoint(config.checkpoint_dir, state, config.checkpoint.keep_last)
        tracker.message(f"saved {final}")

    metrics = {}
    try:
        stop_at = config.train.stop_at
        last = config.train.steps if stop_at is None else min(config.train.steps, stop_at)
        while trainer.step < last and not stop_agreed(stop.requested, trainer.device):
            result = trainer.train_step(loader.next_global_batch())
            metrics = {**result.metrics, "data/skipped_rows": dataset.skipped, "data/epoch": loader.epoch}
            log_step(trainer, config, tracker, metrics, result.skipped)
            if config.checkpoint.every and trainer.step % config.checkpoint.every == 0:
                save()
        save()
    finally:
        stop.restore()
        tracker.close()
    if rank0 and config.logging.plot and (config.run_dir / "metrics.jsonl").exists():
        plot_losses(config.run_dir)
    return metrics


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))

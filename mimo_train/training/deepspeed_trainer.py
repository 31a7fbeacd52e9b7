"""trainer.backend=deepspeed: any transformers causal LM under DeepSpeed ZeRO (stage 2 or 3),
with the megatron path's data, loss, schedules, NaN/Inf skip and checkpoints.

One optimizer step is the megatron path's (training/trainer.py): this rank's micro-batches
(packed rows), each micro-batch's loss a share of the token mean over the global batch, so
any data-parallel size gives the gradient of one process. DeepSpeed divides each backward by
the micro-batch count (its gradient accumulation steps) and averages over the ranks, as
megatron's schedule and DDP do: the same `x micro-batches x DP` undoes both.

- Optimizer: torch AdamW (DeepSpeed's CPUAdam under optimizer offload), in megatron's parameter
  groups (no weight decay on biases and norms: every parameter of fewer than 2 dims), stepped
  by megatron's OptimizerParamScheduler, so cosine / WSD / constant schedules are the same.
- Precision: fp32 on CPU, bf16 on GPU (train.bf16 overrides), as the megatron path.
- A step whose gradient norm is not finite is skipped by ZeRO itself (`was_step_applied`):
  the scheduler does not advance and the step counts toward train.max_skipped_steps.
- Checkpoints (`save_checkpoint` / `load_checkpoint`): DeepSpeed's ZeRO files inside our
  atomic `iter_N` directory (training/checkpoint.commit), with RNG states, data position and
  scheduler; resumed with the same number of ranks and ZeRO stage (ZeRO shards by rank).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mimo_train.parallel.setup import device
from mimo_train.training import checkpoint, hf_student
from mimo_train.training.config import RunConfig
from mimo_train.training.trainer import StepResult, Trainer, lr_scheduler

TAG = "zero"  # DeepSpeed's sub-directory inside iter_N/


def ds_config(config: RunConfig, steps_per_batch: int) -> dict:
    """DeepSpeed's JSON config for this run (every value explicit: transformers' ZeRO-3 hook
    reads it before the engine exists)."""
    t = config.trainer
    bf16 = torch.cuda.is_available() if config.train.bf16 is None else config.train.bf16
    zero = {"stage": t.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    world = dist.get_world_size()
    return merged({
        "train_micro_batch_size_per_gpu": 1,  # one packed row; train.micro_batch samples are packed into it
        "gradient_accumulation_steps": steps_per_batch,
        "train_batch_size": steps_per_batch * world,
        "gradient_clipping": config.optim.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }, t.ds_config)


def merged(base: dict, extra: dict) -> dict:
    """`base` with `extra`'s entries, nested dicts merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def param_groups(model, weight_decay: float) -> list[dict]:
    """megatron's default groups: weight decay on matrices, none on biases and norm weights."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitioned: p.shape is empty
        (decay if len(shape) >= 2 else no_decay).append(p)
    # The scheduler sets every group's weight_decay to its value x wd_mult.
    return [{"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0}]


class DeepSpeedTrainer:
    def __init__(self, config: RunConfig, layout):
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        self.config, self.layout = config, layout
        self.device = device()
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asks for it; a plain `python` run has none
        # DeepSpeed's comm layer adopts our process group (joined by parallel.setup); without this
        # its ZeRO-3 init would see a world of one.
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        world = dist.get_world_size()
        per_rank = config.train.global_batch // config.train.micro_batch
        if per_rank % world:
            raise ValueError(f"train.global_batch={config.train.global_batch} / train.micro_batch="
                             f"{config.train.micro_batch} = {per_rank} micro-batches do not split over {world} ranks")
        self.steps_per_batch = per_rank // world
        self.ds = ds_config(config, self.steps_per_batch)
        # Kept alive: while it exists, from_pretrained partitions each parameter at load (ZeRO-3).
        self._zero3_hook = HfDeepSpeedConfig(self.ds) if config.trainer.zero_stage == 3 else None
        dtype = torch.bfloat16 if self.ds["bf16"]["enabled"] else torch.float32
        model = hf_student.load_model(config.trainer.model_dir, dtype)
        o = config.optim
        groups = param_groups(model, o.weight_decay)
        if config.trainer.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds,
                                                                 dist_init_required=False)
        self.model = [self.engine]  # "model chunks", as the loops and weight sync pass them around
        self.scheduler = lr_scheduler(self.optimizer, config)
        self.weights = [1.0]  # the main depth only: a transformers student has no MTP layers
        self.step = 0
        self.skipped = 0

    # -- one optimizer step -------------------------------------------------------------------

    to_device = Trainer.to_device  # the megatron trainer's: a micro-batch's tensors onto self.device

    def loss_tokens(self, micro_batches: list[dict]) -> torch.Tensor:
        """Loss tokens over the global batch (summed over the ranks), as a [1] tensor."""
        count = torch.zeros(1, dtype=torch.float64, device=self.device)
        for mb in micro_batches:
            count += mb["loss_mask"].float().sum().double().to(self.device)
        dist.all_reduce(count)
        return count

    def run_micro_batches(self, micro_batches: list[dict], loss_fn) -> list[torch.Tensor]:
        """Forward and backward of every micro-batch; `loss_fn(mb) -> (loss, reported sums)`.
        The engine's step at the last one is the optimizer step (or ZeRO's skip)."""
        if len(micro_batches) != self.steps_per_batch:
            raise ValueError(f"{len(micro_batches)} micro-batches on this rank; DeepSpeed was set up for "
                             f"{self.steps_per_batch} (train.global_batch / train.micro_batch / ranks)")
        self.engine.train()
        reported = []
        for mb in micro_batches:
            loss, sums = loss_fn(self.to_device(mb))
            self.engine.backward(loss)
            self.engine.step()
            reported.append(sums)
        return reported

    def _lm_loss(self, count: torch.Tensor, mb: dict):
        out = hf_student.forward(self.engine, mb)
        mask = out.loss_masks[0]
        loss_sum = (out.losses[0] * mask).sum()
        sums = torch.stack([loss_sum.detach().double(), (out.correct[0].float() * mask).sum().double()])
        # DeepSpeed divides by the micro-batch count and averages over the ranks: undo both.
        scale = self.steps_per_batch * dist.get_world_size()
        return loss_sum / count[0].clamp(min=1).float() * scale, sums

    def train_step(self, micro_batches: list[dict]) -> StepResult:
        t0 = time.time()
        count = self.loss_tokens(micro_batches)
        reported = self.run_micro_batches(micro_batches, lambda mb: self._lm_loss(count, mb))
        sums = torch.stack(reported).sum(0)
        dist.all_reduce(sums)
        loss = float(sums[0] / count[0].clamp(min=1))
        metrics = {"loss/total": loss, "loss/main": loss, "acc/main": float(sums[1] / count[0].clamp(min=1))}
        result = self.update(metrics, loss)
        tokens = sum(int(mb["tokens"].numel()) for mb in micro_batches) * dist.get_world_size()
        metrics["tokens_per_s"] = tokens / max(time.time() - t0, 1e-9)
        return result

    def update(self, metrics: dict, loss: float) -> StepResult:
        """After the engine's boundary step: advance the schedule if ZeRO applied the update,
        else count the skip. A non-finite loss with a finite gradient norm cannot happen (the
        gradient of a non-finite loss is not finite)."""
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        lr = self.optimizer.param_groups[0]["lr"]
        applied = self.engine.was_step_applied() and math.isfinite(loss)
        if applied:
            self.scheduler.step(increment=1)
        else:
            self.skipped += 1
        self.step += 1
        metrics.update({"grad_norm": grad_norm, "lr": lr, "skipped": int(not applied), "skipped_total": self.skipped})
        return StepResult(metrics, skipped=not applied)

    # -- checkpoints --------------------------------------------------------------------------

    def state(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "skipped": self.skipped, "backend": "deepspeed",
                "zero_stage": self.config.trainer.zero_stage, "student": str(Path(self.config.trainer.model_dir).resolve())}

    def load_state(self, state: dict) -> None:
        self.step = state["step"]
        self.skipped = state.get("skipped", 0)
        self.scheduler.load_state_dict(state["scheduler"])

    def save_checkpoint(self, checkpoint_dir: Path, state: dict, keep_last: int) -> Path:
        def write(tmp: Path) -> None:
            self.engine.save_checkpoint(str(tmp), tag=TAG, save_latest=False)

        return checkpoint.commit(checkpoint_dir, self.step, {**state, "weights_only": False}, keep_last, write)

    def load_checkpoint(self, path: Path, *, full: bool, rng: bool) -> dict:
        """Resume (`full`: weights, optimizer, RNG) from a checkpoint of this backend."""
        state = checkpoint.read_state(path)
        problem = None
        if state.get("backend") != "deepspeed":
            problem = ("it was saved by the megatron backend; a DeepSpeed run starts from a serving directory: "
                       "export it (tools/export.py) and pass that as trainer.model_dir")
        elif not full:
            problem = ("checkpoint.load starts a DeepSpeed run from nothing but weights, which it takes from "
                       "trainer.model_dir: export the checkpoint (tools/export.py --ckpt ...) and pass that")
        elif state.get("world_size") != dist.get_world_size() or state.get("zero_stage") != self.config.trainer.zero_stage:
            problem = (f"it was saved by {state.get('world_size')} ranks under ZeRO stage {state.get('zero_stage')} and "
                       f"this run has {dist.get_world_size()} under stage {self.config.trainer.zero_stage}; ZeRO files "
                       "are per rank: resume with the same ranks and trainer.zero_stage, or export it and start anew")
        if problem:
            raise checkpoint.CheckpointError(f"cannot resume from {path}: {problem}")
        loaded, _ = self.engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise checkpoint.CheckpointError(f"{path}/{TAG}: DeepSpeed found no checkpoint to load there")
        if rng:
            checkpoint.load_rng_state(path)
        return state

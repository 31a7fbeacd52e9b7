"""The training loop for pretrain and SFT: megatron-core model, DDP, optimizer and pipeline
schedules; our data, loss, checkpoints and tracking.

One optimizer step:
1. this rank's micro-batches of the global batch (packed THD rows, batch 1);
2. the number of loss tokens of each depth over the *global* batch, so each micro-batch's
   loss is a share of the global token mean: any DP size or micro-batch count gives the same
   gradient as one process;
3. megatron's forward-backward schedule (1F1B, interleaved with virtual stages, or none);
4. `finalize_model_grads` (DP/TP grad reduction, the aux-loss-free expert bias update);
5. a step that is skipped, not taken, when the loss or the gradient norm is not finite.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from mimo_train.model import compat
from mimo_train.model.experts import stacked_weights_reused
from mimo_train.model.gpt import MiMoOutput, build_model, roll_left
from mimo_train.model.spec import MegatronOptions, transformer_config
from mimo_train.parallel.layout import Layout
from mimo_train.parallel.setup import device
from mimo_train.training import checkpoint
from mimo_train.training.config import RunConfig
from mimo_train.training.router_stats import RouterStats


class TooManySkippedSteps(RuntimeError):
    pass


@dataclass
class StepResult:
    metrics: dict
    skipped: bool


def megatron_options(config: RunConfig, layout: Layout) -> MegatronOptions:
    p = config.parallel
    moe = any(config.model.moe_layer_freq)
    bf16 = torch.cuda.is_available() if config.train.bf16 is None else config.train.bf16
    return MegatronOptions(
        tp=layout.tp, pp=layout.pp, ep=layout.ep, virtual_pp=layout.vpp,
        # megatron's MoE layer splits tokens over TP ranks: it needs sequence parallel under TP.
        sequence_parallel=p.sequence_parallel or (moe and layout.tp > 1),
        bf16=bf16, mtp_loss_scaling_factor=config.train.mtp_weight,
        expert_bias_update_rate=config.train.expert_bias_update_rate, recompute=p.recompute)


def depth_weights(config: RunConfig) -> list[float]:
    k = config.model.num_nextn_predict_layers
    return [1.0] + [config.train.mtp_weight / k] * k if k else [1.0]


def packed_params(mb: dict) -> PackedSeqParams:
    cu = mb["cu_seqlens"]
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=int(mb["max_seqlen"]), max_seqlen_kv=int(mb["max_seqlen"]))


def lr_scheduler(optimizer, config: RunConfig) -> OptimizerParamScheduler:
    """optim.schedule (cosine, WSD, constant, with warmup) over train.steps: megatron's scheduler,
    which sets each param group's lr and weight decay (x its `wd_mult`); both backends use it."""
    o, steps = config.optim, config.train.steps
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=steps, lr_decay_style={"cosine": "cosine", "wsd": "WSD", "constant": "constant"}[o.schedule],
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=steps, wd_incr_style="constant",
        wsd_decay_steps=max(1, int(o.wsd_decay_fraction * steps)) if o.schedule == "wsd" else None,
        lr_wsd_decay_style="cosine" if o.schedule == "wsd" else None)


def make_trainer(config: RunConfig, layout: Layout):
    """The trainer of `trainer.backend`: this module's (megatron) or DeepSpeed's."""
    if config.trainer.backend == "deepspeed":
        from mimo_train.training.deepspeed_trainer import DeepSpeedTrainer

        return DeepSpeedTrainer(config, layout)
    return Trainer(config, layout)


def fuse_adam(optimizer) -> None:
    """Run torch's AdamW under megatron's optimizer as its fused kernel.

    Without Transformer Engine or Apex, megatron builds `torch.optim.AdamW` with torch's default
    implementation, which on CPU is a Python loop of about ten ops per parameter tensor. The
    fused kernel does the same update in one pass per tensor (the results agree to fp32
    rounding). `fused` is a per-group setting read at each step, so it is set here after
    construction and again after an optimizer state is loaded (a checkpoint's param groups
    carry the setting they were saved with)."""
    for chained in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = chained.optimizer
        if isinstance(inner, torch.optim.AdamW):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False


class Trainer:
    routing_replay = False  # RL: routers record / replay their top-k (megatron's RouterReplay)

    def __init__(self, config: RunConfig, layout: Layout):
        self.config, self.layout = config, layout
        # Batches arrive on CPU; NCCL reduces only CUDA tensors, so metric buffers live here too.
        self.device = device()
        opt = megatron_options(config, layout)
        self.tconfig = tc = transformer_config(config.model, opt)
        tc.moe_enable_routing_replay = self.routing_replay and any(config.model.moe_layer_freq)
        vstages = layout.vpp or 1
        compat.skip_single_rank_buffer_collectives()
        compat.foreach_multi_tensor_fallbacks()
        self.model = []
        for vp in range(vstages):
            chunk = build_model(config.model, opt, vp_stage=vp if layout.vpp else None, config=tc)
            ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=config.parallel.distributed_optimizer)
            self.model.append(DistributedDataParallel(tc, ddp, chunk, disable_bucketing=vp > 0))
        tc.finalize_model_grads_func = finalize_model_grads
        tc.no_sync_func = [m.no_sync for m in self.model] if vstages > 1 else self.model[0].no_sync
        o = config.optim
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
            adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad, bf16=opt.bf16,
            params_dtype=torch.bfloat16 if opt.bf16 else torch.float32,
            use_distributed_optimizer=config.parallel.distributed_optimizer), self.model)
        fuse_adam(self.optimizer)
        self.scheduler = lr_scheduler(self.optimizer, config)
        self.router_stats = RouterStats(self.model, config.model)
        self.weights = depth_weights(config)
        self.step = 0
        self.skipped = 0

    # -- one optimizer step -------------------------------------------------------------------

    def to_device(self, mb: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}

    def depth_token_counts(self, micro_batches: list[dict]) -> torch.Tensor:
        """Loss tokens of each depth over the global batch (summed over data-parallel ranks)."""
        counts = torch.zeros(len(self.weights), dtype=torch.float64, device=self.device)
        for mb in micro_batches:
            mask, packed = mb["loss_mask"].float(), packed_params(mb)
            for depth in range(len(self.weights)):
                if depth:
                    mask = roll_left(mask, packed)
                counts[depth] += mask.sum().double().to(self.device)
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        return counts

    def _loss(self, counts: torch.Tensor, num_microbatches: int, out: MiMoOutput):
        total = 0.0
        sums = []
        for depth, (loss, mask, hit) in enumerate(zip(out.losses, out.loss_masks, out.correct)):
            loss_sum = (loss.float() * mask).sum()
            total = total + self.weights[depth] * loss_sum / counts[depth].clamp(min=1).float()
            sums += [loss_sum.detach(), (hit.float() * mask).sum().detach()]
        # megatron divides by the micro-batch count and DDP averages over DP ranks: undo both,
        # so the gradient is that of the global token mean.
        scale = num_microbatches * parallel_state.get_data_parallel_world_size()
        return total * scale, torch.stack(sums)

    def _forward_step(self, counts, num_microbatches, data_iterator, model):
        mb = self.to_device(next(data_iterator))
        out = model(mb["tokens"], position_ids=mb["position_ids"], labels=mb["labels"],
                    loss_mask=mb["loss_mask"].float(), packed_seq_params=packed_params(mb))
        return out, functools.partial(self._loss, counts, num_microbatches)

    def train_step(self, micro_batches: list[dict]) -> StepResult:
        t0 = time.time()
        counts = self.depth_token_counts(micro_batches)
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.router_stats.reset()
        n = len(micro_batches)
        seq = micro_batches[0]["tokens"].shape[1]
        with stacked_weights_reused(self.model):
            results = get_forward_backward_func()(
                forward_step_func=functools.partial(self._forward_step, counts, n),
                data_iterator=[iter(micro_batches) for _ in self.model] if len(self.model) > 1 else iter(micro_batches),
                model=self.model if len(self.model) > 1 else self.model[0],
                num_microbatches=n, seq_length=seq, micro_batch_size=1, forward_only=False)
        metrics = self._reduce_metrics(results, counts)
        result = self.update(metrics, metrics["loss/total"])
        tokens = sum(int(mb["tokens"].numel()) for mb in micro_batches) * parallel_state.get_data_parallel_world_size()
        metrics["tokens_per_s"] = tokens / max(time.time() - t0, 1e-9)
        return result

    def update(self, metrics: dict, loss: float) -> StepResult:
        """The optimizer step after a forward-backward, skipped (and counted) when the loss or
        the gradient norm is not finite; adds the step's optimizer metrics to `metrics`."""
        found_inf = self.optimizer.prepare_grads()  # True only under an fp16 loss scaler that saw inf
        grad_norm = self.optimizer.get_grad_norm()
        lr = self.optimizer.param_groups[0]["lr"]
        finite = math.isfinite(loss) and math.isfinite(grad_norm) and not found_inf
        if finite:
            finite = bool(self._clip_and_step(grad_norm))
        if finite:
            self.scheduler.step(increment=1)
        else:
            self.skipped += 1
        self.step += 1
        metrics.update({"grad_norm": float(grad_norm), "lr": lr,
                        "skipped": int(not finite), "skipped_total": self.skipped})
        metrics.update(self.router_stats.metrics())
        return StepResult(metrics, skipped=not finite)

    def _clip_and_step(self, grad_norm: float) -> bool:
        """megatron's ChainedOptimizer.step() from its gradient norm on: clip every optimizer's
        gradients by the total norm, then step. (step() itself would prepare the gradients and
        compute the norm a second time.)"""
        for optimizer in getattr(self.optimizer, "chained_optimizers", None) or [self.optimizer]:
            params = optimizer.get_parameters()
            if getattr(optimizer, "is_stub_optimizer", False) or not params or optimizer.config.clip_grad <= 0.0:
                continue
            clip_grad_by_total_norm_fp32(params, max_norm=optimizer.config.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        return self.optimizer.step_with_ready_grads()

    def _reduce_metrics(self, results: list, counts: torch.Tensor) -> dict:
        """Per-depth loss and accuracy over the global batch, known on every rank."""
        depths = len(self.weights)
        sums = torch.zeros(2 * depths, dtype=torch.float64, device=self.device)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        if last:
            for r in results:
                sums += r.double()
            dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        if self.layout.pp > 1:  # only the last stage computed losses; share them along the pipeline
            dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
        metrics = {}
        per_depth = [sums[2 * d] / counts[d].clamp(min=1) for d in range(depths)]
        total = per_depth[0] + (self.config.train.mtp_weight * torch.stack(per_depth[1:]).mean() if depths > 1 else 0)
        metrics["loss/total"] = float(total)
        for d in range(depths):
            name = "main" if d == 0 else f"mtp_{d}"
            metrics[f"loss/{name}"] = float(per_depth[d])
            metrics[f"acc/{name}"] = float(sums[2 * d + 1] / counts[d].clamp(min=1))
        return metrics

    # -- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint_dir, state: dict, keep_last: int):
        # Before the first step there is no optimizer state to save: the weights are the checkpoint.
        return checkpoint.save(checkpoint_dir, self.step, self.model, self.optimizer if self.step > 0 else None,
                               state, keep_last=keep_last)

    def load_checkpoint(self, path, *, full: bool, rng: bool) -> dict:
        """Weights (and with `full` the optimizer; with `rng` this rank's RNG states) in place."""
        state = checkpoint.load(path, self.model, self.optimizer, load_optimizer=full, load_rng=rng)
        fuse_adam(self.optimizer)
        return state

    def state(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "skipped": self.skipped}

    def load_state(self, state: dict) -> None:
        self.step = state["step"]
        self.skipped = state.get("skipped", 0)
        self.scheduler.load_state_dict(state["scheduler"])

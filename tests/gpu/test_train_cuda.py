"""GPU lane: the megatron-core trainer on CUDA, bf16 (with fp32 master weights, the GPU
default) against fp32 on the same batches: the same losses to bf16 rounding, step after step,
and both learn."""

import pytest
import torch

from tools.bench_train import batch_of

pytestmark = pytest.mark.gpu
STEPS = 6


def losses(bf16: bool) -> tuple[list[float], str]:
    from mimo_train.parallel.layout import check_layout
    from mimo_train.parallel.setup import init_distributed
    from mimo_train.training.config import load_config
    from mimo_train.training.trainer import Trainer

    rows = batch_of(256, 4, 64)
    cfg = load_config(["recipe=pretrain", "model=tiny", "train.global_batch=4", "train.micro_batch=1",
                       "optim.warmup_steps=0", "optim.lr=3e-3", f"train.bf16={str(bf16).lower()}"])
    init_distributed(seed=0)
    trainer = Trainer(cfg, check_layout(cfg.model, 1, 1, 1, 1, None, 4, 1))
    device = str(next(trainer.model[0].parameters()).device)
    return [trainer.train_step(rows).metrics["loss/total"] for _ in range(STEPS)], device


def test_bf16_steps_track_fp32_steps_on_cuda():
    fp32, device32 = losses(bf16=False)
    bf16, device16 = losses(bf16=True)
    print(f"fp32 losses {fp32}\nbf16 losses {bf16}")
    assert device32.startswith("cuda") and device16.startswith("cuda")
    assert fp32[-1] < 0.9 * fp32[0] and bf16[-1] < 0.9 * bf16[0]  # both learn the batch
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 2e-2 * abs(a)

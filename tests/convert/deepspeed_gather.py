"""The weights of a trainer=deepspeed checkpoint as DeepSpeed itself holds them: the reference
for tests/convert/test_export_deepspeed.py, independent of the exporter's consolidation.

    python tests/convert/deepspeed_gather.py ITER_DIR STUDENT_DIR OUT.safetensors           (1 rank)
    torchrun --nproc-per-node N tests/convert/deepspeed_gather.py ITER_DIR STUDENT_DIR OUT  (N ranks)

Each rank builds the engine a resumed run builds (the student from its serving dir, torch AdamW
in the trainer's parameter groups, the DeepSpeed config the checkpoint recorded), loads the
checkpoint with DeepSpeed's `load_checkpoint` (weights and optimizer, as a resume does), gathers
every parameter (ZeRO-3 holds a 1/N slice of each) and rank 0 writes them, fp32, to OUT.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(iter_dir: Path, student: Path, out: Path) -> None:
    os.environ.setdefault("RANK", "0")  # a plain `python` run: one rank
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    import deepspeed
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from mimo_train.training.deepspeed_trainer import TAG, param_groups

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    states = sorted((iter_dir / TAG).glob("*model_states.pt"))
    ds_config = torch.load(states[0], map_location="cpu", weights_only=True)["ds_config"]
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    hook = HfDeepSpeedConfig(ds_config) if zero3 else None  # noqa: F841 (partitions at load while alive)
    model = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32, use_safetensors=True)
    optimizer = torch.optim.AdamW(param_groups(model, 0.0), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    loaded, _ = engine.load_checkpoint(str(iter_dir), tag=TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
    assert loaded is not None, f"DeepSpeed loaded nothing from {iter_dir}/{TAG}"
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=zero3):
        weights = {name: p.detach().float().clone().contiguous() for name, p in params}
    if rank == 0:
        save_file(weights, str(out))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))

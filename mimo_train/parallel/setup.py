"""Process groups: torch.distributed (gloo on CPU, NCCL on GPU) and megatron's parallel state."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from mimo_train.model import compat


def expert_tp(tp: int, ep: int) -> int:
    """Tensor-parallel size of the experts. With expert parallelism the experts are whole on
    each rank (megatron needs that for TP x EP on the same ranks); without it they are split like
    the dense layers, because an expert replicated over TP ranks that each route different
    (sequence-parallel) tokens would get its gradient reduced over data-parallel ranks only."""
    return 1 if ep > 1 else tp


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(tp: int = 1, pp: int = 1, ep: int = 1, virtual_pp: int | None = None, seed: int = 1234) -> None:
    """Join (or, alone, create) the process group and set megatron's parallel state.

    Under torchrun the env:// rendezvous is used; without it a one-rank group is made in
    memory, so a plain `python` process can run the megatron model too.
    """
    compat.apply()
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend())
        else:
            dist.init_process_group(backend(), store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp}*{pp}; "
                         f"choose tp and pp whose product divides {world}")
    if (world // pp) % ep:
        raise ValueError(f"expert parallel size {ep} must divide world/pp = {world // pp}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual_pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=expert_tp(tp, ep))
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)

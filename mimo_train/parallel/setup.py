"""Process groups: torch.distributed (NCCL with a GPU per rank, gloo on CPU) and megatron's
parallel state.

The device follows the backend: a run gets NCCL and one GPU per rank only when every local rank
has a GPU of its own; with fewer GPUs than local ranks (a 4-rank test on a 1-GPU machine) it runs
on the CPU with gloo, as on a machine without CUDA. `device()` is the one answer to "where do
this rank's tensors go" for the code that places tensors itself.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from mimo_train.model import compat

# Long enough for rank 0 to run a long rollout or start vLLM servers while the other ranks wait
# in a collective (NCCL's default watchdog would end the run after 10 minutes); override with
# parallel.timeout_minutes.
DEFAULT_TIMEOUT_MINUTES = 60
_timeout_minutes = DEFAULT_TIMEOUT_MINUTES


def expert_tp(tp: int, ep: int) -> int:
    """Tensor-parallel size of the experts. With expert parallelism the experts are whole on
    each rank (megatron needs that for TP x EP on the same ranks); without it they are split like
    the dense layers, because an expert replicated over TP ranks that each route different
    (sequence-parallel) tokens would get its gradient reduced over data-parallel ranks only."""
    return 1 if ep > 1 else tp


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def gpus_for_every_rank() -> bool:
    """CUDA is usable with one GPU per local rank (what NCCL needs)."""
    return torch.cuda.is_available() and local_world_size() <= torch.cuda.device_count()


def _run_on_cpu() -> None:
    """Fewer GPUs than ranks: run this process as on a CUDA-less machine. Every placement and
    precision default in the code base (and megatron's CPU compatibility layer) asks
    `torch.cuda.is_available()`, so answering False here keeps them all on the CPU, in fp32."""
    torch.cuda.is_available = lambda: False


def backend() -> str:
    return "nccl" if gpus_for_every_rank() else "gloo"


def device() -> torch.device:
    """Where this rank's tensors live: its GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def join(timeout_minutes: int = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Join (or, alone, create) the process group, with this timeout for it and for the
    megatron groups `init_distributed` makes. Idempotent.

    Under torchrun the env:// rendezvous is used; without it a one-rank group is made in
    memory, so a plain `python` process can run the megatron model too.
    """
    global _timeout_minutes
    if dist.is_initialized():
        return
    if timeout_minutes < 1:
        raise ValueError(f"parallel.timeout_minutes={timeout_minutes} must be >= 1")
    _timeout_minutes = timeout_minutes
    if torch.cuda.is_available() and not gpus_for_every_rank():
        _run_on_cpu()
    compat.apply()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend(), timeout=timeout)
    else:
        dist.init_process_group(backend(), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def init_distributed(tp: int = 1, pp: int = 1, ep: int = 1, virtual_pp: int | None = None, seed: int = 1234) -> None:
    """`join` the process group (if not joined yet) and set megatron's parallel state."""
    join(_timeout_minutes)
    compat.apply()
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
        expert_tensor_parallel_size=expert_tp(tp, ep), distributed_timeout_minutes=_timeout_minutes)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)

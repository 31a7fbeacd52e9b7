"""Run megatron-core on a machine without CUDA: the one place that knows how.

megatron-core 0.16 calls `torch.cuda` in many places that are device-agnostic in spirit
(tensor placement, RNG bookkeeping, synchronisation). `apply()` patches those calls, at
run time and only when CUDA is absent, so that the unmodified package runs on CPU with the
gloo backend. With CUDA present it does nothing. Every patch below names the megatron code it
serves; `tests/model/test_compat.py` checks each one.

What the patches do:
1. `torch.cuda.current_device()` -> "cpu": megatron places tensors with
   `device=torch.cuda.current_device()` (rotary buffers, MTP loss tracker, optimizer, ...).
2. The "CUDA" RNG that megatron's RNG tracker forks and saves (tensor_parallel/random.py)
   becomes a dedicated CPU `torch.Generator`, separate from the global CPU RNG, so that
   forking it is a real state swap and its state can be checkpointed like on GPU.
3. `torch.cuda.synchronize()` and CUDA streams/events (dist checkpointing, MoE all-to-all
   dispatcher) become no-ops.
4. `moe_utils.te_general_gemm` is undefined without Transformer Engine (NameError in the
   router); define it as None so the router uses plain matmul.
5. The MoE all-to-all dispatcher hands numpy split sizes to `all_to_all_single`, which
   torch 2.13 rejects: convert them to lists.

`placement("meta")` is separate and temporary: it points the same device calls at another
device for the duration of a build (parameter counts of the 309B preset on the meta device).
"""

from __future__ import annotations

import contextlib
import functools

import torch

_APPLIED = False
_RNG = torch.Generator(device="cpu")  # stands in for the CUDA default generator


class _NullStream:
    """Accepts what megatron does with a CUDA stream or event and does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


@contextlib.contextmanager
def _null_stream_ctx(*args, **kwargs):
    yield


def needed() -> bool:
    return not torch.cuda.is_available()


def apply() -> bool:
    """Patch megatron-core for CPU if CUDA is absent. Idempotent; returns whether it patched."""
    global _APPLIED
    if _APPLIED or not needed():
        return _APPLIED
    _patch_torch_cuda()
    _patch_rng()
    _patch_moe()
    _APPLIED = True
    return True


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullStream
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    torch.cuda.stream = _null_stream_ctx
    torch.cuda.get_rng_state = lambda *a, **k: _RNG.get_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: _RNG.set_state(state)
    torch.cuda.manual_seed = lambda seed: _RNG.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: _RNG.manual_seed(int(seed))


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: _RNG.get_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: _RNG.set_state(state)


def _patch_moe() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    from megatron.core.tensor_parallel import mappings

    original = mappings._AllToAll.forward

    @functools.wraps(original)
    def forward(ctx, group, input, output_split_sizes, input_split_sizes):
        def as_list(sizes):
            return sizes.tolist() if hasattr(sizes, "tolist") else sizes

        return original(ctx, group, input, as_list(output_split_sizes), as_list(input_split_sizes))

    mappings._AllToAll.forward = staticmethod(forward)


@contextlib.contextmanager
def placement(device: str):
    """Place the tensors megatron creates with `device=torch.cuda.current_device()` on `device`
    (e.g. "meta", to build a model of any size without memory), on any machine."""
    apply()
    previous = torch.cuda.current_device
    torch.cuda.current_device = lambda: device
    try:
        with torch.device(device):
            yield
    finally:
        torch.cuda.current_device = previous

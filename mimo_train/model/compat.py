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
6. The optimizer package (optimizer.py, distrib_optimizer.py, clip_grads.py, and the
   multi-tensor fallbacks in megatron/core/utils.py), the pipeline schedules and the checkpoint
   saver create scalars
   with a literal `device='cuda'` and checks `param.type() == 'torch.cuda.FloatTensor'`: those
   modules see a `torch` whose factories map 'cuda' to 'cpu'; `Tensor.type()` answers with
   the CUDA type name when (and only when) the caller is megatron's optimizer package, and
   `Tensor.cuda()` called from megatron-core returns the tensor itself.

`fix_torch_adam_checkpoint()` is not about CUDA and is applied on any machine: with torch's
AdamW (no Apex/TE), the distributed optimizer's fully-reshardable checkpoint load copies every
optimizer-state key, including Adam's `step`, which the checkpoint keeps elsewhere (KeyError).

`single_process_checkpoint_queue()` is also applied on any machine: megatron's checkpoint
writer collects results through a queue served by a spawn-context `Manager` process, which
outlives a training process killed with SIGKILL (and keeps its stdout open). Our saves are
synchronous (the queue is filled and read in the training process), so a plain in-process
queue serves the same purpose.

`skip_single_rank_buffer_collectives()` is applied on any machine too, by the trainer: with one
data-parallel rank the distributed optimizer's parameter all-gather and gradient reduce-scatter
(distributed/param_and_grad_buffer.py) gather a buffer into itself, which gloo still copies.
Over a group of one rank the result is the input, so the call is skipped (or is a copy where
megatron passes two separate buffers).

`foreach_multi_tensor_fallbacks()` (any machine without Apex/TE, by the trainer): megatron's own
stand-ins for Apex's multi-tensor kernels (megatron/core/utils.py) take the gradient norm one
tensor at a time and then build a tensor from a Python list of 0-d tensors, and scale gradients
one tensor at a time (`dst.copy_(src * scale)`); the replacements do the same arithmetic with
torch's foreach ops (the same norms and products, without a Python loop over 290 tensors).

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
    """Patch megatron-core for CPU if CUDA is absent. Idempotent; returns whether it patched.
    On any device, first make megatron-core usable without Transformer Engine (below)."""
    global _APPLIED
    _without_transformer_engine()
    if _APPLIED or not needed():
        return _APPLIED
    _patch_torch_cuda()
    _patch_rng()
    _patch_moe()
    _patch_optimizer()
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


def _without_transformer_engine() -> None:
    """megatron-core 0.16.1 imports `te_general_gemm` only when Transformer Engine is installed,
    then tests `te_general_gemm is not None` in the MoE router's gating: without TE every MoE
    forward raises NameError, on a GPU as on CPU (seen on an H200 by tools/gpu_check.py). None is
    what the check means by "no TE"."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_moe() -> None:
    from megatron.core.tensor_parallel import mappings

    original = mappings._AllToAll.forward

    @functools.wraps(original)
    def forward(ctx, group, input, output_split_sizes, input_split_sizes):
        def as_list(sizes):
            return sizes.tolist() if hasattr(sizes, "tolist") else sizes

        return original(ctx, group, input, as_list(output_split_sizes), as_list(input_split_sizes))

    mappings._AllToAll.forward = staticmethod(forward)


class _CpuTorch:
    """`torch`, except that tensor factories asked for device 'cuda' build on the CPU."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "zeros_like", "ones_like", "empty_like")

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name not in self._FACTORIES:
            return value

        @functools.wraps(value)
        def factory(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return value(*args, **kwargs)

        return factory


def _patch_optimizer() -> None:
    import sys

    from megatron.core import utils
    from megatron.core.dist_checkpointing.strategies import state_dict_saver
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.pipeline_parallel import schedules

    cpu_torch = _CpuTorch()
    # utils holds the multi-tensor fallbacks (l2 norm, scale) that clip_grads calls.
    for module in (clip_grads, distrib_optimizer, optimizer, utils, schedules, state_dict_saver):
        module.torch = cpu_torch

    original_type = torch.Tensor.type

    @functools.wraps(original_type)
    def tensor_type(self, *args, **kwargs):
        name = original_type(self, *args, **kwargs)
        if args or kwargs or self.device.type != "cpu":
            return name
        caller = sys._getframe(1).f_globals.get("__name__", "")
        return name.replace("torch.", "torch.cuda.", 1) if caller.startswith("megatron.core.optimizer") else name

    torch.Tensor.type = tensor_type

    original_cuda = torch.Tensor.cuda

    @functools.wraps(original_cuda)
    def tensor_cuda(self, *args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__", "").startswith("megatron.core"):
            return self  # e.g. the distributed optimizer's checkpoint gather: stays on the CPU
        return original_cuda(self, *args, **kwargs)

    torch.Tensor.cuda = tensor_cuda


def fix_torch_adam_checkpoint() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_mimo_fixed", False):
        return

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():  # "step" is restored by load_state_dict itself
            destination[key].copy_(value)

    set_states._mimo_fixed = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def single_process_checkpoint_queue() -> None:
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def skip_single_rank_buffer_collectives() -> None:
    from megatron.core.distributed import param_and_grad_buffer as buffers

    def single_rank_aware(collective):
        if getattr(collective, "_mimo_single_rank", False):
            return collective

        @functools.wraps(collective)
        def call(output, input, *args, group=None, async_op=False, **kwargs):
            if group is None or group.size() > 1:
                return collective(output, input, *args, group=group, async_op=async_op, **kwargs)
            if output.data_ptr() != input.data_ptr() or output.shape != input.shape:
                output.copy_(input.view_as(output))  # one rank: the gather/reduction of one tensor is itself
            return None

        call._mimo_single_rank = True
        return call

    buffers.dist_all_gather_func = single_rank_aware(buffers.dist_all_gather_func)
    buffers.dist_reduce_scatter_func = single_rank_aware(buffers.dist_reduce_scatter_func)


def foreach_multi_tensor_fallbacks() -> None:
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        norms = [n for tensors in tensor_lists for n in torch._foreach_norm(tensors)]
        if not norms:  # where megatron's stand-in puts its result: on the current device
            return torch.zeros(1, device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu"), None
        total = torch.linalg.vector_norm(torch.stack(norms))
        return total.reshape(1).float(), None

    def scale(chunk_size, noop_flag, tensor_lists, factor):
        sources, targets = tensor_lists[0], tensor_lists[1]
        if all(s is t for s, t in zip(sources, targets)):
            torch._foreach_mul_(targets, factor)
        else:
            torch._foreach_copy_(targets, torch._foreach_mul(sources, factor))

    for module in (clip_grads, optimizer):
        if getattr(module, "l2_norm_impl", None) is utils.local_multi_tensor_l2_norm:
            module.l2_norm_impl = l2_norm
        if getattr(module, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = scale


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

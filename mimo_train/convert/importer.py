"""Serving-format directory -> a weights-only training checkpoint that `checkpoint.load=`
accepts, in the conventions of `mimo_train.training.checkpoint`:

    <out>/latest                      "iter_0000000"
    <out>/iter_0000000/               megatron dist_checkpointing (torch_dist) of the model
    <out>/iter_0000000/mimo_state.json {"model": asdict(ModelConfig), "weights_only": true, ...}

Each rank builds its part of the model under the requested layout (TP/PP/EP/VPP, under
torchrun, or one process), copies into every tensor the slice megatron says it owns (read from
the serving files one full tensor at a time) and saves with megatron's own sharded state dict,
so the keys, the fused [gate; up] layout and the `_extra_state` entries are exactly what a
training run saves and loads. The checkpoint is layout-free: a layout here only spreads the
memory, any layout can load the result.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

from mimo_train.convert import atomic
from mimo_train.convert.names import DTYPES, ConvertError, ours_name
from mimo_train.convert.serving_reader import ServingSource
from mimo_train.model.gpt import build_model
from mimo_train.model.spec import MegatronOptions, transformer_config
from mimo_train.parallel.layout import LayoutError, check_layout
from mimo_train.parallel.setup import init_distributed
from mimo_train.training import checkpoint as training_checkpoint

ITER = "iter_0000000"


def _metadata() -> dict:
    # As training saves (checkpoint._sharded): the DP group is needed when the MTP stage
    # holds a tied copy of the embedding under pipeline parallelism.
    return {**training_checkpoint.SHARDING,
            "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


def fill(chunk, readers: dict, dtype: torch.dtype = torch.float32) -> int:
    """Copy into this rank's model chunk the slice of every tensor it holds; returns the
    number of elements copied. `readers[ours name](dtype)` reads one full tensor."""
    sharded = chunk.sharded_state_dict(metadata=_metadata())
    apply_factories(sharded)  # splits fused SwiGLU fc1 into its gate/up ShardedTensors (views)
    tensors = [t for t in nested_values(sharded) if isinstance(t, ShardedTensor)]
    tensors.sort(key=lambda t: (t.key, t.global_offset[: t.prepend_axis_num]))  # gate/up of one tensor together
    cached, copied = (None, None), 0
    for t in tensors:
        if t.flattened_range is not None or t.prepend_axis_num > 1:
            raise ConvertError(f"{t.key}: unsupported sharding (flattened or >1 prepended axis)")
        index = t.global_offset[0] if t.prepend_axis_num else None
        name = ours_name(t.key, index)
        if cached[0] != name:
            if name not in readers:
                raise ConvertError(f"the model has {name} but the mapping to serving names does not")
            cached = (name, readers[name](dtype))
        part = cached[1][t.global_slice()[t.prepend_axis_num:]]
        if tuple(part.shape) != tuple(t.data.shape):
            raise ConvertError(f"{name}: slice {tuple(part.shape)} does not fit the model's {tuple(t.data.shape)}")
        with torch.no_grad():
            t.data.copy_(part)
        copied += part.numel()
    return copied


def import_serving(hf: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1, vpp: int | None = None,
                   dtype: str = "fp32", overwrite: bool = False, log=print) -> Path:
    """Convert; every rank calls this (one process, or each rank under torchrun)."""
    if dtype not in DTYPES:
        raise ConvertError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    source = ServingSource(hf)
    source.check()  # names, shapes, scales: before any model is built or file written
    cfg = source.config
    out = atomic.check_output(out, overwrite)
    init_distributed(tp, pp, ep, vpp)
    world, rank = dist.get_world_size(), dist.get_rank()
    try:
        layout = check_layout(cfg, world, tp, pp, ep, vpp, global_batch=max(world // (tp * pp), 1), micro_batch=1)
    except LayoutError as e:
        raise ConvertError(str(e)) from e
    opt = MegatronOptions(tp=tp, pp=pp, ep=ep, virtual_pp=vpp, bf16=dtype == "bf16",
                          sequence_parallel=any(cfg.moe_layer_freq) and tp > 1)
    tc = transformer_config(cfg, opt)
    chunks = [build_model(cfg, opt, vp_stage=vp if vpp else None, config=tc) for vp in range(vpp or 1)]
    readers = source.ours()
    copied = sum(fill(chunk, readers, DTYPES[dtype]) for chunk in chunks)

    tmp = atomic.start(out) if rank == 0 else atomic.temp_dir(out)
    dist.barrier()
    try:
        (tmp / ITER).mkdir(exist_ok=True)
        dist_checkpointing.save({f"model{i}": c.sharded_state_dict(metadata=_metadata())
                                 for i, c in enumerate(chunks)}, str(tmp / ITER))
    except BaseException:
        if world == 1:  # with more ranks the others may still be writing; the next run removes it
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    if rank == 0:
        state = {"model": dataclasses.asdict(cfg), "step": 0, "weights_only": True,
                 "layout": dataclasses.asdict(layout), "world_size": world,
                 "imported_from": {"path": str(Path(hf).resolve()), "fp8_dequantised": bool(source.fp8),
                                   "dtype": dtype}}
        # The state file is what marks a checkpoint complete: written last, then `latest`.
        atomic.fsync_write(tmp / ITER / training_checkpoint.STATE_FILE, json.dumps(state, indent=1))
        atomic.fsync_write(tmp / "latest", ITER)
        atomic.commit(tmp, out)
        log(f"imported {hf} -> {out / ITER} ({len(source.fp8)} FP8 tensors dequantised; layout tp={tp} pp={pp} "
            f"ep={ep}; rank 0 copied {copied} elements)")
    dist.barrier()
    return out

"""Trainer weights (any TP/PP/EP/DP layout, live in memory) -> full tensors under the serving
names, on one rank: what the rollout engine and the teachers load.

The same path as export: megatron's sharded state dict says where each local shard sits in
its global tensor (replicas skipped), the shards are gathered to one rank and assembled, and
`convert.exporter.plan` maps checkpoint keys to serving names (split fused gate/up, one
tensor per expert). One mapping module, three users (export, import, weight sync).

The gather goes through `gather_object` (pickled tensors): simple and layout-agnostic, fine
for the models a CPU or one node trains here; at 309B one would stream per-bucket
broadcasts from each owner instead (rollout/weight_sync.py does the engine side of that).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

from mimo_train.convert.exporter import _convert, plan
from mimo_train.model.config import ModelConfig


def _is_main_replica(replica_id) -> bool:
    ids = replica_id if isinstance(replica_id, tuple) else (replica_id,)
    return all(i == 0 for i in ids)


def sharded_metadata() -> dict:
    """What megatron's `sharded_state_dict` needs to say which rank owns which shard."""
    return {"distrib_optim_sharding_type": "fully_reshardable",
            "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


def iter_shards(model_chunks):
    """(key, global shape, global offset, data) of every shard this rank owns (no replicas);
    data is a view of the parameter, with the axes the shard prepends (experts) as size 1."""
    for chunk in model_chunks:
        sd = getattr(chunk, "module", chunk).sharded_state_dict(metadata=sharded_metadata())
        apply_factories(sd)
        for sh in nested_values(sd):
            if not isinstance(sh, ShardedTensor) or sh.key.endswith("_extra_state") or not _is_main_replica(sh.replica_id):
                continue
            if sh.flattened_range is not None:
                # Only the distributed optimizer's state is flattened; model weights never are.
                raise RuntimeError(f"{sh.key}: a flattened shard in the model's state dict; expected whole tensor shards")
            data = sh.data.detach()
            yield sh.key, tuple(sh.global_shape), tuple(sh.global_offset), \
                data.reshape((1,) * sh.prepend_axis_num + tuple(data.shape))


def local_shards(model_chunks) -> list[tuple[str, tuple, tuple, torch.Tensor]]:
    """`iter_shards` with the data on the CPU in fp32 (what the gather sends)."""
    return [(key, shape, offset, data.to("cpu", torch.float32)) for key, shape, offset, data in iter_shards(model_chunks)]


def assemble(shards) -> dict[str, torch.Tensor]:
    """Checkpoint key -> full tensor, from every rank's shards."""
    full: dict[str, torch.Tensor] = {}
    written: dict[str, int] = {}
    for key, shape, offset, data in shards:
        if key not in full:
            full[key] = torch.empty(shape, dtype=torch.float32)
        region = tuple(slice(o, o + n) for o, n in zip(offset, data.shape))
        full[key][region] = data
        written[key] = written.get(key, 0) + data.numel()
    # Main replicas tile each tensor exactly once: anything else is a gap or an overlap.
    wrong = [f"{k}: {written[k]} of {full[k].numel()} elements" for k in full if written[k] != full[k].numel()]
    if wrong:
        raise RuntimeError(f"weight gather: shards do not tile their tensors: {'; '.join(wrong[:5])}")
    return full


def serving_weights(full: dict[str, torch.Tensor], cfg: ModelConfig, *, mtp: bool = True) -> dict[str, torch.Tensor]:
    out = {}
    for e in plan(cfg, mtp=mtp and cfg.num_nextn_predict_layers > 0, quantize=False):
        tensor = full[e.key] if e.index is None else full[e.key][e.index]
        out.update(_convert(e, tensor, torch.float32, None))
    return out


def gather_serving_weights(model_chunks, cfg: ModelConfig, *, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """Collective over the world: rank `dst` gets every weight under its serving name, fp32;
    other ranks get None."""
    shards = local_shards(model_chunks)
    if dist.get_world_size() == 1:
        return serving_weights(assemble(shards), cfg)
    everyone = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(shards, everyone, dst=dst)
    if dist.get_rank() != dst:
        return None
    return serving_weights(assemble(s for rank in everyone for s in rank), cfg)

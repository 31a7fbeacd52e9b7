"""Work that only rank 0 does (the rollout engine or servers, the teachers), with its errors
seen by every rank."""

from __future__ import annotations

import torch.distributed as dist


def on_rank0(work, *, share: bool = True):
    """Run `work` on rank 0; with `share` every rank gets its result (other ranks get None
    otherwise). An error on rank 0 is raised on every rank, with rank 0's message, so no rank
    is left waiting in a collective for a rank that has gone."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return work()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = work()
        except Exception as err:  # raised below, after every rank has heard of it
            error = err
    box = [(f"{type(error).__name__}: {error}" if error else None, result if share and not error else None)]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    message, shared = box[0]
    if message is not None:
        raise RuntimeError(f"rank 0 failed: {message}")
    return result if dist.get_rank() == 0 else shared

"""Work that only rank 0 does (the rollout engine or servers, the teachers), with its errors
seen by every rank."""

from __future__ import annotations

import pickle

import torch.distributed as dist


class Rank0Failed(RuntimeError):
    """Raised on the other ranks when rank 0's work failed. `original` is rank 0's exception,
    rebuilt here (None when it cannot be pickled), so the entry point reports the same line on
    every rank; str() is rank 0's message."""

    def __init__(self, message: str, original: BaseException | None):
        super().__init__(message)
        self.original = original


def seen_by_every_rank(error: BaseException) -> bool:
    """Whether every rank is raising this failure of rank 0's work (so every rank can still meet
    in a collective, e.g. to finish reporting it before any rank exits)."""
    return isinstance(error, Rank0Failed) or getattr(error, "_mimo_rank0_shared", False)


def _portable(error: BaseException) -> BaseException | None:
    """`error` if it survives pickling (most exceptions do; a custom one with required keyword
    arguments may not), else None."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return None


def on_rank0(work, *, share: bool = True):
    """Run `work` on rank 0; with `share` every rank gets its result (other ranks get None
    otherwise). An error on rank 0 is raised on every rank (`Rank0Failed` on the others, with
    rank 0's message), so no rank is left waiting in a collective for a rank that has gone."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return work()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = work()
        except Exception as err:  # raised below, after every rank has heard of it
            error = err
    failure = (str(error), f"{type(error).__name__}", _portable(error)) if error is not None else None
    box = [(failure, result if share and not error else None)]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        error._mimo_rank0_shared = True
        raise error
    failure, shared = box[0]
    if failure is not None:
        message, kind, original = failure
        raise Rank0Failed(message if original is not None else f"{kind}: {message}", original)
    return result if dist.get_rank() == 0 else shared

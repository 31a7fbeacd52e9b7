"""Training checkpoints: megatron-core distributed checkpoints, written atomically.

Layout of `<checkpoint dir>`:

    latest                  "iter_0000040": the last complete checkpoint
    iter_0000040/           megatron dist_checkpointing files (model + optimizer, any layout)
        mimo_state.json     step, scheduler, data position, model config, layout (written last)
        rng/rank_00000.pt   every RNG state of each rank

A save goes to `iter_N.tmp/` and is renamed to `iter_N/` only when every rank has finished
and the state file is on disk; `latest` is then replaced atomically, and both renames are made
durable (fsync of the directory). A crash at any moment leaves the previous checkpoint and
`latest` untouched; a leftover `.tmp` is deleted by the next save.

`latest` is the commit point. A save of step N when `iter_N/` exists:
- `latest` names it: this run resumed from it or has just saved it, so it already holds this
  state; nothing is written. (`check_fresh_start` makes sure a run that does not resume never
  meets another run's `latest`.)
- `latest` does not name it: it was never committed (a crash between the rename and `latest`,
  or a dir whose `latest` was removed); it is replaced, and `latest` advanced, without a moment
  where `latest` names no complete checkpoint.

Model and optimizer tensors are stored by their global (layout-free) keys, so a checkpoint
resumes under a different TP/PP/DP layout; RNG states are per rank and are restored only under
the same layout (the data position is global either way). Between EP=1 and EP>1 only the
weights carry over (`checkpoint.load`): megatron-core gives the expert parameters an optimizer
of their own only under expert parallelism, and a resume across that line is refused
(training/loop.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

from mimo_train.model import compat

STATE_FILE = "mimo_state.json"
# The optimizer state is saved per parameter in the canonical (unsharded) form, so it reloads
# under any data-parallel size.
SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    """Make the renames and creations inside `path` durable (a rename is only in the directory
    until the directory itself is flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _complete(checkpoint_dir: Path) -> list[Path]:
    """The complete `iter_N` dirs, by step."""
    dirs = [p for p in Path(checkpoint_dir).glob("iter_*")
            if p.is_dir() and p.name[5:].isdigit() and (p / STATE_FILE).exists()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(),  # on CPU: the generator compat.py stands in with
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _bare(chunk):
    return getattr(chunk, "module", chunk)


def _sharded(model_chunks, optimizer, is_loading: bool) -> dict:
    """The sharded state dict of the model chunks, and of the optimizer unless it is None."""
    # The DDP wrapper would prefix every key with "module."; the keys are the bare model's.
    # megatron reads the DP group from the metadata when the MTP stage holds a tied copy of
    # the embedding (pipeline parallel).
    metadata = {**SHARDING, "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    model = {f"model{i}": _bare(chunk).sharded_state_dict(metadata=metadata) for i, chunk in enumerate(model_chunks)}
    # Nested, not merged: with virtual stages the chunks reuse local layer names.
    if optimizer is None:
        return model
    return {**model, "optimizer": optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=metadata)}


def _init_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its Adam state before loading into it: with torch's
    AdamW (no Apex/TE) megatron reads the state's `step` while building the sharded dict to
    load, before it would create the state itself. The dummy values are all overwritten."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer) and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def _unshare_adam_steps(optimizer) -> None:
    """megatron's distributed optimizer restores torch Adam's per-parameter `step` as one
    tensor shared by every parameter; torch then increments it once per parameter per step.
    Give each parameter its own copy, as a run that never stopped has."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        for state in getattr(torch_optimizer, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def latest(checkpoint_dir: Path) -> Path | None:
    """The last complete checkpoint, or None if there is none."""
    pointer = Path(checkpoint_dir) / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"{pointer} points to {path}, which is not a complete checkpoint "
                              f"(no {STATE_FILE}); point it to a complete iter_* dir, or move {checkpoint_dir} "
                              "away to start over")
    return path


def check_fresh_start(checkpoint_dir: Path) -> None:
    """A run that does not resume (checkpoint.resume=false) must not save into a checkpoint
    dir with a `latest`: a step that run committed would count as already saved, and the two
    runs' checkpoints would be pruned against each other. Called before any work."""
    pointer = Path(checkpoint_dir) / "latest"
    if pointer.exists():
        raise CheckpointError(
            f"checkpoint dir {checkpoint_dir} holds another run (latest: {pointer.read_text().strip()}) and "
            "checkpoint.resume=false: set checkpoint.dir (or logging.run_dir) to a new directory, or move the old "
            "one away, or resume it with checkpoint.resume=true")


def save(checkpoint_dir: Path, step: int, model_chunks, optimizer, state: dict, keep_last: int) -> Path:
    """Save on every rank; returns the final directory. `optimizer=None` writes the weights
    only (`"weights_only": true` in the state file): a starting point, not a resumable run."""
    return commit(checkpoint_dir, step, {**state, "weights_only": optimizer is None}, keep_last,
                  lambda tmp: dist_checkpointing.save(_sharded(model_chunks, optimizer, is_loading=False), str(tmp)))


def commit(checkpoint_dir: Path, step: int, state: dict, keep_last: int, write) -> Path:
    """The atomic save every backend shares (module docstring): `write(tmp)` writes this rank's
    part of the model and optimizer into `iter_N.tmp/` (every rank); then each rank's RNG
    states, rank 0's state file, the rename and `latest`. Returns the final directory."""
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / f"iter_{step:07d}"
    tmp = checkpoint_dir / f"iter_{step:07d}.tmp"
    rank = dist.get_rank()
    compat.single_process_checkpoint_queue()
    pointer = checkpoint_dir / "latest"
    if (final / STATE_FILE).exists() and pointer.exists() and pointer.read_text().strip() == final.name:
        return final  # committed, and this run's own state (see the module docstring)
    if rank == 0:
        for stale in [tmp, *checkpoint_dir.glob("iter_*.old")]:  # left by a crash during an earlier save
            if stale.exists():
                shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    dist.barrier()
    write(tmp)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        _fsync_write(tmp / STATE_FILE, json.dumps({**state, "step": step, "world_size": dist.get_world_size()},
                                                  indent=1))
        # An uncommitted iter_N (latest names another checkpoint) is moved aside, not deleted,
        # until the new one has taken its name and `latest` names it.
        old = checkpoint_dir / f"iter_{step:07d}.old"
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(checkpoint_dir)
        _fsync_write(pointer, final.name)
        shutil.rmtree(old, ignore_errors=True)
        # Prune by step, among this run's steps: a dir beyond `step` is not older than this one.
        for older in [p for p in _complete(checkpoint_dir) if int(p.name[5:]) <= step][:-keep_last]:
            shutil.rmtree(older, ignore_errors=True)
    dist.barrier()
    return final


def read_state(path: Path) -> dict:
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"{path} is not a complete mimo-train checkpoint (no {STATE_FILE})")
    return json.loads((path / STATE_FILE).read_text())


def load(path: Path, model_chunks, optimizer, *, load_optimizer: bool = True, load_rng: bool = True) -> dict:
    """Load model (and optimizer, and this rank's RNG) in place; returns the saved state."""
    path = Path(path)
    state = read_state(path)
    if load_optimizer:
        compat.fix_torch_adam_checkpoint()
        _init_optimizer_state(optimizer)
    if load_optimizer and state.get("weights_only"):
        raise CheckpointError(f"{path} holds weights only (no optimizer state): use it as checkpoint.load")
    sharded = _sharded(model_chunks, optimizer if load_optimizer else None, is_loading=True)
    loaded = dist_checkpointing.load(sharded, str(path))
    for i, chunk in enumerate(model_chunks):
        _bare(chunk).load_state_dict(loaded[f"model{i}"])
    if load_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    elif optimizer is not None:  # bf16 runs keep fp32 master copies of the weights: refresh them
        optimizer.reload_model_params()
    if load_rng:
        load_rng_state(path)
    return state


def load_rng_state(path: Path) -> None:
    """This rank's RNG states as saved (none saved for this rank: left as they are)."""
    rng_file = Path(path) / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))

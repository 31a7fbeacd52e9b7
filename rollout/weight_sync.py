"""Trainer -> rollout-engine weight sync over torch.distributed (gloo on CPU, NCCL on GPU).

The trainer rank calls `send_weights` with tensors under the serving names (what
`hf_mapping.to_hf` gives, main model and MTP layers together); every engine rank in the group
calls `receive_weights`. A manifest (names, shapes, dtypes, version) goes first as a Python
object, then the tensors in a few flat buckets, so a large model costs a handful of
collectives rather than one per tensor. The engine checks names and shapes before it writes
anything: a bad manifest raises on the engine side after the collectives complete, so neither
side is left waiting.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

BUCKET_BYTES = 64 << 20


def _buckets(entries: list[tuple[str, tuple[int, ...], torch.dtype]], bucket_bytes: int) -> list[list[int]]:
    """Indices of entries grouped into flat buffers of one dtype, about bucket_bytes each."""
    buckets, current, size, dtype = [], [], 0, None
    for i, (_, shape, dt) in enumerate(entries):
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
        if current and (dt != dtype or size + nbytes > bucket_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size, dtype = size + nbytes, dt
    if current:
        buckets.append(current)
    return buckets


def _device(group) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")


def send_weights(named_tensors, *, src: int = 0, group=None, version: int | None = None,
                 bucket_bytes: int = BUCKET_BYTES) -> None:
    """Broadcast weights from this rank (src) to the engines of `group`."""
    items = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
    entries = [(name, tuple(t.shape), t.dtype) for name, t in items]
    manifest = {"version": version, "entries": entries, "buckets": _buckets(entries, bucket_bytes)}
    dist.broadcast_object_list([manifest], src=src, group=group)
    device = _device(group)
    for bucket in manifest["buckets"]:
        flat = torch.cat([items[i][1].detach().reshape(-1).to(device) for i in bucket])
        dist.broadcast(flat, src=src, group=group)


def receive_weights(engine, *, src: int = 0, group=None) -> int:
    """Receive a `send_weights` broadcast and apply it with `engine.update_weights`; returns
    the engine's new policy version (the sender's version, or the old one + 1)."""
    box = [None]
    dist.broadcast_object_list(box, src=src, group=group)
    manifest = box[0]
    device = _device(group)
    received = {}
    for bucket in manifest["buckets"]:
        entries = [manifest["entries"][i] for i in bucket]
        flat = torch.empty(sum(torch.Size(shape).numel() for _, shape, _ in entries), dtype=entries[0][2],
                           device=device)
        dist.broadcast(flat, src=src, group=group)
        offset = 0
        for name, shape, _ in entries:
            count = torch.Size(shape).numel()
            received[name] = flat[offset:offset + count].view(shape)
            offset += count
    return engine.update_weights(received, version=manifest["version"])

"""The weight-streaming protocol between trainer ranks and inference workers.

Both sides import this module: the trainer (our environment) and the vLLM workers (vLLM's
environment, through the plugin), so it needs nothing but torch and the standard library.

A *piece* is a rectangular region of one weight under its serving name: the whole tensor
when one rank owns it, a tensor-parallel slice otherwise. The trainer ranks that own pieces
pack them into *buckets* (flat buffers of one dtype, at most `max_bytes` each, a piece larger
than that split along its first dimension) and send each bucket point-to-point to every
inference worker of the group. The manifest (`plan_buckets`) lists every bucket in the order it
travels, so a worker knows what to receive from whom before the first byte; it `Assembler`s
the pieces back into whole tensors and loads each one as soon as it is complete. No rank ever
holds more than one bucket beyond its own weights, and a worker holds at most the tensors
still being assembled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"weight streaming carries {sorted(DTYPES)}, not {dtype}")


@dataclass(frozen=True)
class Piece:
    """A region of the tensor `name` (whole shape `shape`): `size` elements per dimension,
    starting at `offset`."""

    name: str
    shape: tuple[int, ...]
    offset: tuple[int, ...]
    size: tuple[int, ...]

    def __post_init__(self):
        if not (len(self.shape) == len(self.offset) == len(self.size)):
            raise ValueError(f"piece of {self.name}: shape, offset and size need one entry per dimension")
        if any(o < 0 or n < 0 or o + n > s for s, o, n in zip(self.shape, self.offset, self.size)):
            raise ValueError(f"piece of {self.name}: offset {self.offset} + size {self.size} leaves shape {self.shape}")

    @property
    def numel(self) -> int:
        return math.prod(self.size)

    @property
    def whole(self) -> bool:
        return self.size == self.shape

    def rows(self, start: int, count: int) -> "Piece":
        """Rows [start, start + count) of this piece (along its first dimension)."""
        return Piece(self.name, self.shape, (self.offset[0] + start, *self.offset[1:]), (count, *self.size[1:]))

    def to_json(self) -> list:
        return [self.name, list(self.shape), list(self.offset), list(self.size)]

    @classmethod
    def from_json(cls, row: list) -> "Piece":
        name, shape, offset, size = row
        return cls(name, tuple(shape), tuple(offset), tuple(size))


@dataclass
class Bucket:
    src: int  # the sender's rank in the transfer group
    dtype: str
    pieces: list[Piece]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.pieces)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    def to_json(self) -> dict:
        return {"src": self.src, "dtype": self.dtype, "pieces": [p.to_json() for p in self.pieces]}

    @classmethod
    def from_json(cls, row: dict) -> "Bucket":
        return cls(int(row["src"]), str(row["dtype"]), [Piece.from_json(p) for p in row["pieces"]])


def split_piece(piece: Piece, itemsize: int, max_bytes: int) -> list[Piece]:
    """The piece, cut along its first dimension into parts of at most max_bytes."""
    if piece.numel * itemsize <= max_bytes:
        return [piece]
    row_bytes = math.prod(piece.size[1:]) * itemsize
    if row_bytes > max_bytes or len(piece.size) == 0:
        raise ValueError(f"{piece.name}: one row is {row_bytes} bytes, more than the bucket size {max_bytes}; "
                         "raise the bucket size")
    per = max_bytes // row_bytes
    return [piece.rows(start, min(per, piece.size[0] - start)) for start in range(0, piece.size[0], per)]


def plan_buckets(pieces_by_src: dict[int, list[tuple[Piece, str]]], max_bytes: int) -> list[Bucket]:
    """Group every sender's (piece, dtype) list into buckets of one dtype and at most max_bytes,
    sender by sender, keeping each sender's order (pieces are cut to fit where needed)."""
    if max_bytes < 1:
        raise ValueError(f"bucket size must be >= 1 byte, got {max_bytes}")
    buckets: list[Bucket] = []
    for src in sorted(pieces_by_src):
        current: Bucket | None = None
        for piece, dtype in pieces_by_src[src]:
            itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
            for part in split_piece(piece, itemsize, max_bytes):
                nbytes = part.numel * itemsize
                if current is None or current.dtype != dtype or current.nbytes + nbytes > max_bytes:
                    current = Bucket(src, dtype, [])
                    buckets.append(current)
                current.pieces.append(part)
    return buckets


def region(piece: Piece, origin: Piece | None = None) -> tuple[slice, ...]:
    """Index of `piece` inside the whole tensor, or inside `origin` (a piece containing it)."""
    base = origin.offset if origin is not None else (0,) * len(piece.offset)
    return tuple(slice(o - b, o - b + n) for o, b, n in zip(piece.offset, base, piece.size))


def pack(bucket: Bucket, tensors: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """One flat buffer holding the bucket's pieces in order (each tensor has its piece's size)."""
    flat = torch.empty(bucket.numel, dtype=DTYPES[bucket.dtype], device=device)
    start = 0
    for piece, t in zip(bucket.pieces, tensors, strict=True):
        if tuple(t.shape) != piece.size:
            raise ValueError(f"{piece.name}: tensor of shape {tuple(t.shape)} for a piece of size {piece.size}")
        flat[start:start + piece.numel].view(piece.size).copy_(t)
        start += piece.numel
    return flat


def unpack(bucket: Bucket, flat: torch.Tensor) -> Iterator[tuple[Piece, torch.Tensor]]:
    start = 0
    for piece in bucket.pieces:
        yield piece, flat[start:start + piece.numel].view(piece.size)
        start += piece.numel


class Assembler:
    """Pieces in, whole tensors out: `add` returns the tensors a piece completes. A whole
    piece passes through without a copy (a view of the bucket: load it before the bucket's
    buffer is reused)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = device
        self.partial: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (tensor, elements still missing)

    def add(self, piece: Piece, data: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if piece.whole and piece.name not in self.partial:
            return [(piece.name, data)]
        tensor, missing = self.partial.get(piece.name) or (
            torch.empty(piece.shape, dtype=data.dtype, device=self.device), math.prod(piece.shape))
        if tuple(tensor.shape) != piece.shape:
            raise ValueError(f"{piece.name}: pieces disagree on the whole shape ({tuple(tensor.shape)} vs {piece.shape})")
        tensor[region(piece)].copy_(data)
        missing -= piece.numel
        if missing < 0:
            raise ValueError(f"{piece.name}: pieces overlap (more elements than the tensor has)")
        if missing == 0:
            del self.partial[piece.name]
            return [(piece.name, tensor)]
        self.partial[piece.name] = (tensor, missing)
        return []

    def finish(self) -> None:
        if self.partial:
            names = sorted(self.partial)
            raise ValueError(f"weight update incomplete: {len(names)} tensor(s) missing pieces: {names[:8]}")


def receive(link: "Link", buckets: list[Bucket], load: Callable[[str, torch.Tensor], None]) -> None:
    """A worker's side of one transfer: every bucket of the manifest, from its sender, in
    order; `load(name, tensor)` for each whole tensor as soon as its last piece arrives (the
    tensor may be a view of the bucket: copy what you keep)."""
    assembler = Assembler(link.device)
    for bucket in buckets:
        flat = torch.empty(bucket.numel, dtype=DTYPES[bucket.dtype], device=link.device)
        link.recv(flat, bucket.src)
        for piece, data in unpack(bucket, flat):
            for name, tensor in assembler.add(piece, data):
                load(name, tensor)
        del flat
    assembler.finish()


def manifest_bytes(buckets: list[Bucket]) -> int:
    return sum(b.nbytes for b in buckets)


class Link:
    """A process group of its own (not torch.distributed's default one) joining trainer ranks and
    inference workers, with the store it met through (rank 0 serves it: it lives as long as the
    group)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, *, backend: str = "gloo",
                 timeout_s: float = 300.0):
        from torch.distributed import PrefixStore, TCPStore

        timeout = timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.store = TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
        prefixed = PrefixStore("mimo_weights", self.store)
        if backend == "gloo":
            from torch.distributed import ProcessGroupGloo

            self.group = ProcessGroupGloo(prefixed, rank, world_size, timeout=timeout)
        elif backend == "nccl":
            from torch.distributed import ProcessGroupNCCL

            self.group = ProcessGroupNCCL(prefixed, rank, world_size)
        else:
            raise ValueError(f"weight transfer backend {backend!r}: use gloo or nccl")

    @property
    def device(self) -> str:
        return "cuda" if self.backend == "nccl" else "cpu"

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.group.send([tensor], dst, 0).wait()

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        self.group.recv([tensor], src, 0).wait()

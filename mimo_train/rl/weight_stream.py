"""Trainer -> inference-server weight streaming: every rank sends the weights it owns.

Each rank turns the shards it owns (megatron's sharded state dict: tensor-parallel slices,
its experts, its pipeline stage's layers; replicas skipped) into *pieces* under the serving
names, through the export plan (`convert.exporter.plan`, built on `hf_mapping`: one mapping
for export, import and sync). Rank 0 gathers the pieces' metadata (names and regions, no
data), cuts them into buckets of at most `bucket_bytes` (`mimo_train_vllm.wire`) and shares
the plan; then every rank packs its own buckets one at a time and sends each to every worker
of the server. The extra memory a rank holds is one bucket (plus one piece being reshaped,
where the server's geometry differs: `ServingGeometry`), whatever the model's size.
The main model and the MTP layers travel as two plans: vLLM loads them into two models
(the target and the drafter).

Where the weights come from is a *weight source*, one per trainer kind (`WeightSource`): the
megatron model's shards here (`MegatronWeights`), a DeepSpeed ZeRO engine's transformers model in
`mimo_train.rl.zero_weights`. A source opens a `Stream` per update: the plan (the same on every
rank) and, bucket by bucket, the packed data of the buckets this rank sends; the sync
(`vllm_weight_sync`) only moves those buffers, whatever the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

from mimo_train.convert.exporter import KEEP_FP32, Entry, plan
from mimo_train.model.config import ModelConfig
from mimo_train.rl.weight_gather import iter_shards
from mimo_train.rollout.vllm.server import PADDED, ServingGeometry, pad_head_channels
from mimo_train_vllm import wire

MTP_PREFIX = "model.mtp."


@dataclass
class LocalPiece:
    piece: wire.Piece
    dtype: str  # on the wire
    tensor: Callable[[], torch.Tensor]  # the piece's data (a view where it can be), made when packed


def _entries_by_key(cfg: ModelConfig, mtp: bool) -> dict[str, list[Entry]]:
    out: dict[str, list[Entry]] = {}
    for e in plan(cfg, mtp=mtp, quantize=False):
        out.setdefault(e.key, []).append(e)
    return out


def _entry_region(e: Entry, shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """[lo, hi) of the entry's tensor in its checkpoint tensor (stacked experts, fused gate/up)."""
    lo, hi, d = [0] * len(shape), list(shape), 0
    if e.index is not None:
        lo[0], hi[0], d = e.index, e.index + 1, 1
    if e.half is not None:
        rows = shape[d] // 2
        lo[d], hi[d] = e.half * rows, (e.half + 1) * rows
    return lo, hi


def _pieces_of_shard(entries: list[Entry], shape: tuple[int, ...], offset: tuple[int, ...], data: torch.Tensor):
    """(piece, tensor view) for every serving tensor a checkpoint shard overlaps."""
    for e in entries:
        lo, hi = _entry_region(e, shape)
        start = [max(a, o) for a, o in zip(lo, offset)]
        stop = [min(b, o + n) for b, o, n in zip(hi, offset, data.shape)]
        if any(a >= b for a, b in zip(start, stop)):
            continue
        view = data[tuple(slice(a - o, b - o) for a, b, o in zip(start, stop, offset))]
        rel = [a - b for a, b in zip(start, lo)]
        size = [b - a for a, b in zip(start, stop)]
        if e.index is not None:  # the expert axis is not part of the serving tensor
            view, rel, size = view[0], rel[1:], size[1:]
        yield wire.Piece(e.hf, tuple(e.shape), tuple(rel), tuple(size)), view


def _pad_heads(piece: wire.Piece, fetch, dim: int, dv: int, dk: int) -> tuple[wire.Piece, Callable]:
    """Zero-pad each head's `dv` channels along `dim` to `dk` (pieces hold whole heads)."""
    if piece.offset[dim] % dv or piece.size[dim] % dv:
        raise ValueError(f"{piece.name}: a piece that splits a head ({piece.offset[dim]}+{piece.size[dim]} along "
                         f"dim {dim}, head size {dv}) cannot be padded")
    scale = lambda v: v // dv * dk  # noqa: E731
    grow = lambda t: tuple(scale(v) if i == dim else v for i, v in enumerate(t))  # noqa: E731

    def padded() -> torch.Tensor:
        return pad_head_channels(fetch(), dim, dv, dk)

    return wire.Piece(piece.name, grow(piece.shape), grow(piece.offset), grow(piece.size)), padded


def local_pieces(model_chunks, cfg: ModelConfig, *, dtype: torch.dtype,
                 geometry: ServingGeometry = ServingGeometry()) -> list[LocalPiece]:
    """Every serving-name piece this rank owns (main replicas only), in a stable order."""
    mtp = cfg.num_nextn_predict_layers > 0
    entries = _entries_by_key(cfg, mtp)
    wire_dtype = wire.dtype_name(dtype)
    out = []
    for key, shape, offset, data in iter_shards(model_chunks):
        if key not in entries:
            continue
        for piece, view in _pieces_of_shard(entries[key], shape, offset, data):
            fetch = (lambda v: lambda: v)(view)
            if geometry.pad_v_head and piece.name.endswith(PADDED):
                d = cfg.attention_dims(swa=MTP_PREFIX in piece.name or cfg.is_swa(_layer(piece.name)))
                dim = 0 if piece.name.endswith("v_proj.weight") else 1
                piece, fetch = _pad_heads(piece, fetch, dim, d["v_head_dim"], d["head_dim"])
            keep = piece.name.endswith(KEEP_FP32)
            out.append(LocalPiece(piece, "float32" if keep else wire_dtype, fetch))
    return out


def _layer(name: str) -> int:
    return int(name.split(".")[2])  # model.layers.{i}.


@dataclass
class StreamPlan:
    main: list[wire.Bucket]  # target model: everything but the MTP layers
    draft: list[wire.Bucket]  # MTP layers (vLLM's drafter)
    bucket_bytes: int

    @property
    def nbytes(self) -> int:
        return wire.manifest_bytes(self.main) + wire.manifest_bytes(self.draft)


def plan_stream(pieces: list[LocalPiece], bucket_bytes: int, *, group=None) -> StreamPlan:
    """Collective over the trainer's ranks: the buckets of every rank, the same on each."""
    mine = [(p.piece, p.dtype) for p in pieces]
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        everyone = [mine]
    else:
        everyone = [None] * world
        dist.all_gather_object(everyone, mine, group=group)
    by_src = lambda keep: {r: [(p, d) for p, d in rows if keep(p)] for r, rows in enumerate(everyone)}  # noqa: E731
    main = wire.plan_buckets(by_src(lambda p: not p.name.startswith(MTP_PREFIX)), bucket_bytes)
    draft = wire.plan_buckets(by_src(lambda p: p.name.startswith(MTP_PREFIX)), bucket_bytes)
    return StreamPlan(main, draft, bucket_bytes)


class Stream(Protocol):
    """One update's weights: `plan` (the same on every rank) and `packed`, which every rank
    iterates over the same buckets (a source may run a collective per bucket) and which yields
    (bucket, flat buffer) for the buckets this rank sends, one buffer alive at a time."""

    plan: StreamPlan

    def packed(self, buckets: list[wire.Bucket], rank: int,
               device: str = "cpu") -> Iterator[tuple[wire.Bucket, torch.Tensor]]:
        ...


class WeightSource(Protocol):
    """Where a trainer's weights come from (one implementation per trainer kind)."""

    def open(self, model_chunks, bucket_bytes: int) -> Stream:
        """Collective over the trainer's ranks: this update's stream."""
        ...


class PieceStream:
    """A stream of pieces each rank already holds (megatron's shards): packing is a copy."""

    def __init__(self, plan: StreamPlan, pieces: list[LocalPiece]):
        self.plan = plan
        self.by_name: dict[str, list[LocalPiece]] = {}
        for p in pieces:
            self.by_name.setdefault(p.piece.name, []).append(p)

    def packed(self, buckets: list[wire.Bucket], rank: int,
               device: str = "cpu") -> Iterator[tuple[wire.Bucket, torch.Tensor]]:
        for bucket in buckets:
            if bucket.src == rank:
                yield bucket, wire.pack(bucket, (_rows(self.by_name, part) for part in bucket.pieces), device=device)


@dataclass
class MegatronWeights:
    """The megatron trainer's model chunks: every rank sends the shards it owns, under the
    serving names of `cfg` in `geometry`, in `dtype` (fp32 where the export keeps it)."""

    cfg: ModelConfig
    dtype: torch.dtype
    geometry: ServingGeometry = field(default_factory=ServingGeometry)

    def open(self, model_chunks, bucket_bytes: int) -> PieceStream:
        pieces = local_pieces(model_chunks, self.cfg, dtype=self.dtype, geometry=self.geometry)
        return PieceStream(plan_stream(pieces, bucket_bytes), pieces)


def send_buckets(stream: Stream, buckets: list[wire.Bucket], rank: int,
                 targets: list[tuple[wire.Link, list[int]]], device: str = "cpu") -> int:
    """Send this rank's buckets of `stream` to every worker of every (link, workers) target, one
    bucket in memory at a time (packed once for all targets); returns the largest bucket sent
    (bytes). Every rank calls it over the same buckets (a stream may gather per bucket)."""
    largest = 0
    for _, flat in stream.packed(buckets, rank, device):
        for link, workers in targets:
            for worker in workers:
                link.send(flat, worker)
        largest = max(largest, flat.numel() * flat.element_size())
        del flat
    return largest


def _rows(by_name: dict[str, list[LocalPiece]], part: wire.Piece) -> torch.Tensor:
    """The data of a bucket's piece: one of this rank's pieces, or rows of it (plan_buckets cuts
    pieces larger than a bucket along their first dimension)."""
    for p in by_name.get(part.name, ()):
        q = p.piece
        if q.offset[1:] == part.offset[1:] and q.size[1:] == part.size[1:] and \
                q.offset[0] <= part.offset[0] and part.offset[0] + part.size[0] <= q.offset[0] + q.size[0]:
            return p.tensor().narrow(0, part.offset[0] - q.offset[0], part.size[0])
    raise KeyError(f"{part.name} at {part.offset}: not among this rank's pieces")


def serving_tensors(model_chunks, cfg: ModelConfig, *, dtype: torch.dtype = torch.float32,
                    geometry: ServingGeometry = ServingGeometry(), bucket_bytes: int = 64 << 20) -> dict[str, torch.Tensor]:
    """One process: the whole model under serving names in `geometry`, through the same pieces and
    buckets a stream uses (what a server started from files, rather than streamed into, loads)."""
    return received(MegatronWeights(cfg, dtype, geometry).open(model_chunks, bucket_bytes))


def received(stream: Stream, rank: int = 0) -> dict[str, torch.Tensor]:
    """What a server's worker would load from `stream` (the buckets `rank` sends: all of them in
    one process), through the wire's own unpacking and assembly; tensors cloned."""
    out, assembler = {}, wire.Assembler()
    for bucket, flat in stream.packed(stream.plan.main + stream.plan.draft, rank):
        for piece, data in wire.unpack(bucket, flat):
            for name, tensor in assembler.add(piece, data):
                out[name] = tensor.clone()
    assembler.finish()
    return out

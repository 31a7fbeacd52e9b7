"""Weight streaming from a DeepSpeed ZeRO engine (trainer.backend=deepspeed): the weight source
for a transformers student (`weight_stream.WeightSource`).

Names: the model's parameter names, which are the names `save_pretrained` writes and vLLM's
`load_weights` reads (`model.layers.0.self_attn.q_proj.weight`, ...). A tied lm_head is the
embedding's parameter and is not sent (vLLM ties it itself). The first update checks every
name against the student's own safetensors: a model whose parameters transformers renames at
load would otherwise fail inside the server, far from the cause.

Under ZeRO-3 every parameter is partitioned over the ranks (`ds_shape` is its real shape).
Each bucket's parameters are gathered (`deepspeed.zero.GatheredParameters`, a collective every
rank enters), the sender packs and sends the bucket, and the gather is released before the
next one: a rank holds at most one bucket's parameters beyond its partition, never the model.
A parameter larger than a bucket travels in row slices over buckets of its own, gathered once
for all of them: then a rank holds that one parameter (the embedding, typically), the one
exception to "one bucket". Under ZeRO-2 every rank holds the whole model and nothing is gathered.

Who sends: rank 0, every bucket. The servers' workers receive the buckets one after another
in the manifest's order, so more senders would not move bytes faster; they would only spread
the packing, which is a copy. Under ZeRO-3 every rank takes part in every gather whoever
sends, so the sender's only extra is the one packed buffer. And with one sender every rank
derives the same plan from the model's structure alone, with no metadata exchange.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mimo_train.rl.weight_stream import StreamPlan
from mimo_train_vllm import wire

SENDER = 0  # see the module docstring


class StudentWeightsError(ValueError):
    """A student whose parameters cannot be streamed under their checkpoint names."""


def hf_module(model_chunks):
    """The transformers model inside the trainer's chunks ([DeepSpeedEngine] or a bare model)."""
    if len(model_chunks) != 1:
        raise ValueError(f"a DeepSpeed trainer has one model chunk, got {len(model_chunks)}")
    return getattr(model_chunks[0], "module", model_chunks[0])


def shape_of(p: torch.nn.Parameter) -> tuple[int, ...]:
    """The parameter's real shape (ZeRO-3 leaves an empty placeholder in `p.shape`)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def streamed_parameters(module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of everything a server loads, in the module's order. A parameter
    shared by two names (tied embeddings) is listed once, under its first name."""
    tied = bool(getattr(getattr(module, "config", None), "tie_word_embeddings", False))
    return [(n, p) for n, p in module.named_parameters() if not (tied and n == "lm_head.weight")]


def checkpoint_names(model_dir: str | Path) -> set[str]:
    """Tensor names in a serving directory's safetensors (headers only, no data read)."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            names.update(handle.keys())
    return names


def check_names(params: list[tuple[str, torch.nn.Parameter]], model_dir: str | Path, model_type: str | None) -> None:
    known = checkpoint_names(model_dir)
    missing = [n for n, _ in params if n not in known]
    if missing:
        raise StudentWeightsError(
            f"weight streaming: {len(missing)} parameter(s) of the student ({model_type}) are not tensors of "
            f"{model_dir}'s safetensors ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): vLLM loads "
            "weights under their checkpoint names and transformers renames this model's parameters at load; "
            "use rollout=vllm with a student whose parameters keep their checkpoint names (dense Llama, Qwen2/3, "
            "Mistral do)")


@dataclass
class ZeroWeights:
    """The weight source of a DeepSpeed engine (ZeRO-2 or 3): its transformers model's
    parameters in `dtype` on the wire, sent by rank `SENDER`."""

    dtype: torch.dtype
    model_dir: str | Path | None = None  # checked once: every parameter is one of its tensors
    _checked: bool = field(default=False, init=False, repr=False)

    def open(self, model_chunks, bucket_bytes: int) -> ZeroStream:
        module = hf_module(model_chunks)
        params = streamed_parameters(module)
        if self.model_dir is not None and not self._checked:
            check_names(params, self.model_dir, getattr(getattr(module, "config", None), "model_type", None))
            self._checked = True
        dtype = wire.dtype_name(self.dtype)
        pieces = [wire.Piece(n, shape_of(p), (0,) * len(shape_of(p)), shape_of(p)) for n, p in params]
        # Every rank computes this plan from the model's structure: the same everywhere, no exchange.
        return ZeroStream(StreamPlan(plan_alone_if_large(pieces, dtype, bucket_bytes), [], bucket_bytes), dict(params))


class ZeroStream:
    def __init__(self, plan: StreamPlan, params: dict[str, torch.nn.Parameter]):
        self.plan, self.params = plan, params

    def packed(self, buckets: list[wire.Bucket], rank: int,
               device: str = "cpu") -> Iterator[tuple[wire.Bucket, torch.Tensor]]:
        """Every rank, over the same buckets: gather each group's parameters (ZeRO-3), yield the
        packed buckets this rank sends, release the gather."""
        for group in gather_groups(buckets):
            params = [self.params[n] for n in dict.fromkeys(p.name for b in group for p in b.pieces)]
            with gathered(params):
                for bucket in group:
                    if bucket.src == rank:
                        yield bucket, wire.pack(bucket, (self._rows(part) for part in bucket.pieces), device=device)

    def _rows(self, part: wire.Piece) -> torch.Tensor:
        data = self.params[part.name].data
        if tuple(data.shape) != part.shape:
            raise RuntimeError(f"{part.name}: holds {tuple(data.shape)} while being sent, expected {part.shape} "
                               "(a ZeRO-3 parameter that was not gathered)")
        return data.narrow(0, part.offset[0], part.size[0]) if data.dim() else data


def plan_alone_if_large(pieces: list[wire.Piece], dtype: str, bucket_bytes: int) -> list[wire.Bucket]:
    """Buckets of `SENDER`, in the pieces' order, where a tensor larger than a bucket has buckets
    of its own: gathered once for all its row slices, it never shares a gather with a neighbour
    (nor chains into the next large one)."""
    itemsize = torch.empty((), dtype=wire.DTYPES[dtype]).element_size()
    buckets: list[wire.Bucket] = []
    run: list[tuple[wire.Piece, str]] = []
    for piece in pieces:
        if piece.numel * itemsize > bucket_bytes:
            buckets += wire.plan_buckets({SENDER: run}, bucket_bytes)
            buckets += wire.plan_buckets({SENDER: [(piece, dtype)]}, bucket_bytes)
            run = []
        else:
            run.append((piece, dtype))
    return buckets + wire.plan_buckets({SENDER: run}, bucket_bytes)


def gather_groups(buckets: list[wire.Bucket]) -> list[list[wire.Bucket]]:
    """Consecutive buckets that share a parameter (the row slices of one too large for a bucket:
    `plan_alone_if_large` gives it buckets of its own), merged: each group is gathered once."""
    groups: list[list[wire.Bucket]] = []
    names: set[str] = set()
    for bucket in buckets:
        mine = {p.name for p in bucket.pieces}
        if groups and mine & names:
            groups[-1].append(bucket)
            names |= mine
        else:
            groups.append([bucket])
            names = mine
    return groups


def gathered(params: list[torch.nn.Parameter]):
    """ZeRO-3: the whole parameters on every rank for the block (read only: modifier_rank=None,
    nothing is written back); otherwise they are whole already."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

"""Documents -> fixed-length packed samples -> THD micro-batches.

A document is a token list plus, per token, whether that token is trained on as a target
(pretrain: every token; SFT: the response and eos only). Within a document, position j
predicts token j+1, so `labels[j] = tokens[j+1]` and `loss_mask[j] = target[j+1]`; the last
token of a document predicts nothing (label 0, mask 0), so no label ever crosses into the next
document.

Packing is greedy in document order: a document goes into the current sample if it fits,
otherwise the sample is closed with a pad segment and the document starts the next one. A
document longer than `seq_len` is first cut into chunks of `seq_len`; each chunk becomes a
document of its own (positions from 0, its own attention segment). That drops one prediction
per cut (the chunk's last token cannot see across the boundary) but keeps every segment
self-contained, so a sample's meaning never depends on the sample before it.

The pad segment (if any) ends a sample: pad tokens, positions from 0, labels 0, mask 0, and
its own entry in `doc_lens`, so attention of real tokens never reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Document:
    tokens: list[int]
    targets: list[bool]  # targets[j]: token j counts as a prediction target (of position j-1)

    def __len__(self) -> int:
        return len(self.tokens)


def pretrain_document(ids: list[int], bos: int | None, eos: int | None) -> Document:
    tokens = ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
    return Document(tokens, [True] * len(tokens))


def sft_document(prompt: list[int], response: list[int], bos: int | None, eos: int | None) -> Document:
    """bos + prompt + response + eos; only the response and eos are targets."""
    head = ([bos] if bos is not None else []) + prompt
    tail = response + ([eos] if eos is not None else [])
    return Document(head + tail, [False] * len(head) + [True] * len(tail))


def split_long(doc: Document, seq_len: int) -> list[Document]:
    return [Document(doc.tokens[i:i + seq_len], doc.targets[i:i + seq_len]) for i in range(0, len(doc), seq_len)]


@dataclass
class PackedSamples:
    """N samples of S tokens; `doc_lens[i]` are sample i's segment lengths (pad last), summing to S."""

    tokens: np.ndarray  # [N, S] int64
    labels: np.ndarray  # [N, S] int64
    loss_mask: np.ndarray  # [N, S] float32
    position_ids: np.ndarray  # [N, S] int64
    doc_lens: list[list[int]]

    def __len__(self) -> int:
        return len(self.doc_lens)

    def sample(self, i: int) -> dict:
        # Copies, so a caller editing a sample in place cannot change the dataset.
        return {"tokens": torch.tensor(self.tokens[i]), "labels": torch.tensor(self.labels[i]),
                "loss_mask": torch.tensor(self.loss_mask[i]), "position_ids": torch.tensor(self.position_ids[i]),
                "doc_lens": list(self.doc_lens[i])}


def group(docs: list[Document], seq_len: int, pack: bool = True) -> list[list[Document]]:
    """Which documents go into each sample (documents already at most `seq_len` long)."""
    samples: list[list[Document]] = []
    current: list[Document] = []
    used = 0
    for doc in docs:
        if current and (not pack or used + len(doc) > seq_len):
            samples.append(current)
            current, used = [], 0
        current.append(doc)
        used += len(doc)
    if current:
        samples.append(current)
    return samples


def pack_documents(docs: list[Document], seq_len: int, pad_id: int, pack: bool = True) -> PackedSamples:
    """Split, group and lay out `docs` into samples of exactly `seq_len` tokens."""
    pieces = [piece for doc in docs if doc.tokens
              for piece in (split_long(doc, seq_len) if len(doc) > seq_len else (doc,))]
    groups = group(pieces, seq_len, pack)
    n = len(groups)
    tokens = np.full((n, seq_len), pad_id, dtype=np.int64)
    labels = np.zeros((n, seq_len), dtype=np.int64)
    loss_mask = np.zeros((n, seq_len), dtype=np.float32)
    position_ids = np.zeros((n, seq_len), dtype=np.int64)
    doc_lens: list[list[int]] = []
    for i, members in enumerate(groups):
        start, lens = 0, []
        for doc in members:
            end = start + len(doc)
            tokens[i, start:end] = doc.tokens
            labels[i, start:end - 1] = doc.tokens[1:]
            loss_mask[i, start:end - 1] = doc.targets[1:]
            position_ids[i, start:end] = np.arange(len(doc))
            lens.append(len(doc))
            start = end
        if start < seq_len:  # the pad segment: its own document, never a target
            position_ids[i, start:] = np.arange(seq_len - start)
            lens.append(seq_len - start)
        doc_lens.append(lens)
    return PackedSamples(tokens, labels, loss_mask, position_ids, doc_lens)


def collate_thd(samples: list[dict]) -> dict:
    """m samples of S tokens -> one packed row [1, m*S] with attention boundaries.

    `cu_seqlens` (int32, [n_docs + 1]) are the cumulative segment lengths over every document
    (pad segments included) of every sample; `max_seqlen` is the longest segment, as THD
    attention kernels and megatron's PackedSeqParams expect.
    """
    lens = [n for s in samples for n in s["doc_lens"]]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0).to(torch.int32)
    out = {key: torch.cat([s[key] for s in samples]).unsqueeze(0)
           for key in ("tokens", "labels", "loss_mask", "position_ids")}
    out["cu_seqlens"] = cu
    out["max_seqlen"] = max(lens)
    return out

"""The training data: config, packed dataset, and the resumable data-parallel loader.

    dataset = PackedDataset(DataConfig(path=..., tokenizer=..., seq_len=256))
    loader = DataLoader(dataset, global_batch=G, micro_batch=m, dp_rank=r, dp_size=D)
    for micro_batch in loader.next_global_batch(): ...   # THD dicts, see packing.collate_thd

Order: packed samples form one global stream, epoch after epoch (with `shuffle`, each epoch is
a new permutation seeded by (seed, epoch)). Global batch t is stream positions
[t*G, (t+1)*G); rank r of D takes the r-th contiguous G/D of them, in micro-batches of m.
The loader's state is just the number of samples consumed, so a resume under any data-parallel
size (or even another global batch) continues the stream exactly where it stopped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from mimo_train.data.packing import (Document, PackedSamples, collate_thd, pack_documents, pretrain_document,
                                     sft_document)
from mimo_train.data.sources import BadRows, load_rows

KINDS = ("pretrain", "sft")
BAD_ROWS = ("skip", "error")


@dataclass
class DataConfig:
    path: str = "data/synthetic/train.jsonl"  # file or directory of .jsonl/.json/.parquet/.arrow, or save_to_disk dir
    kind: str = "pretrain"  # pretrain: loss on every token; sft: loss on the response (and eos) only
    text_field: str = "text"  # pretrain rows
    prompt_field: str = "prompt"  # sft rows
    response_field: str = "response"  # sft rows
    tokenizer: str = "data/synthetic/tokenizer"  # a local directory for AutoTokenizer.from_pretrained
    seq_len: int = 256  # tokens per packed sample
    pack: bool = True  # false: one document (or chunk of one) per sample, padded
    bad_rows: str = "skip"  # skip (and count) rows with a missing/empty/non-string field, or error
    add_bos: bool = True
    add_eos: bool = True
    shuffle: bool = True  # shuffle documents before packing, and samples every epoch
    seed: int = 0

    def validate(self) -> None:
        for name, value, allowed in (("kind", self.kind, KINDS), ("bad_rows", self.bad_rows, BAD_ROWS)):
            if value not in allowed:
                raise ValueError(f"data.{name}={value!r} is not allowed; use one of: {', '.join(allowed)}")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len} is too small; use an integer >= 2")
        for name in ("path", "tokenizer", "text_field", "prompt_field", "response_field"):
            if not getattr(self, name):
                raise ValueError(f"data.{name} is empty; give a non-empty string")

    @property
    def fields(self) -> list[str]:
        return [self.text_field] if self.kind == "pretrain" else [self.prompt_field, self.response_field]


def load_tokenizer(directory: str):
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"data.tokenizer={directory} does not exist: expected a tokenizer directory "
                                "loadable by AutoTokenizer.from_pretrained (tools/make_data.py writes OUT/tokenizer)")
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


class PackedDataset:
    """Rows of `config.path`, tokenized and packed into samples of `config.seq_len` tokens.

    `skipped` counts malformed rows skipped under `bad_rows=skip`; `skip_reasons` holds the
    first few, each naming the file and row. `loss_tokens[i]` is sample i's loss-mask sum.
    """

    def __init__(self, config: DataConfig):
        config.validate()
        self.config = config
        tokenizer = load_tokenizer(config.tokenizer)
        # Pad tokens are never attended to nor trained on, so any id works when there is no pad token.
        self.pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        bos = _special_id(tokenizer, "bos", config.add_bos)
        eos = _special_id(tokenizer, "eos", config.add_eos)

        bad = BadRows(config.bad_rows)
        rows = load_rows(config.path, config.fields, bad)
        self.skipped, self.skip_reasons = bad.count, bad.reasons
        if not rows:
            raise ValueError(f"data.path={config.path}: no usable rows ({self.skipped} malformed rows skipped"
                             f"{': ' + '; '.join(self.skip_reasons) if self.skip_reasons else ''})")
        self.num_documents = len(rows)
        docs = _documents(tokenizer, config.kind, rows, bos, eos)
        if config.shuffle:  # mix neighbouring rows (files are often grouped by source) into samples
            docs = [docs[i] for i in np.random.default_rng([config.seed, 0]).permutation(len(docs))]
        self.samples: PackedSamples = pack_documents(docs, config.seq_len, self.pad_id, config.pack)
        self.loss_tokens = self.samples.loss_mask.sum(axis=1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples.sample(i)

    def fingerprint(self) -> str:
        """A digest of the packed tokens and masks: a resume checks it is reading the same data."""
        h = hashlib.sha1()
        for array in (self.samples.tokens, self.samples.loss_mask):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()[:16]


def _special_id(tokenizer, name: str, wanted: bool) -> int | None:
    if not wanted:
        return None
    token_id = getattr(tokenizer, f"{name}_token_id")
    if token_id is None:
        raise ValueError(f"the tokenizer at data.tokenizer={tokenizer.name_or_path} has no {name} token; "
                         f"set data.add_{name}=false")
    return token_id


def _documents(tokenizer, kind: str, rows: list[tuple[str, ...]], bos: int | None, eos: int | None) -> list[Document]:
    def ids(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]  # batched: one call, fast tokenizer

    if kind == "pretrain":
        return [pretrain_document(t, bos, eos) for t in ids([r[0] for r in rows])]
    prompts, responses = ids([r[0] for r in rows]), ids([r[1] for r in rows])
    return [sft_document(p, r, bos, eos) for p, r in zip(prompts, responses)]


class DataLoader:
    """This data-parallel rank's micro-batches of each global batch, resumable by sample count.

    Every micro-batch dict also carries `global_loss_tokens`: the loss-mask sum of the whole
    global batch over all ranks (main next-token depth), computed from the global indices
    without communication, for normalising the loss to a global token mean.
    """

    def __init__(self, dataset: PackedDataset, global_batch: int, micro_batch: int = 1,
                 dp_rank: int = 0, dp_size: int = 1):
        if min(global_batch, micro_batch, dp_size) < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need global_batch, micro_batch, dp_size >= 1 and 0 <= dp_rank < dp_size; got "
                             f"global_batch={global_batch}, micro_batch={micro_batch}, dp_rank={dp_rank}, "
                             f"dp_size={dp_size}")
        step = dp_size * micro_batch
        if global_batch % step:
            raise ValueError(
                f"train.global_batch={global_batch} must be divisible by data-parallel size x train.micro_batch "
                f"= {dp_size} x {micro_batch} = {step}; use a multiple of {step}, e.g. "
                f"train.global_batch={-(-global_batch // step) * step}")
        self.dataset = dataset
        self.global_batch, self.micro_batch, self.dp_rank, self.dp_size = global_batch, micro_batch, dp_rank, dp_size
        self.shuffle, self.seed = dataset.config.shuffle, dataset.config.seed
        self.consumed_samples = 0
        self._orders: dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample indices in the order epoch `epoch` visits them."""
        if epoch not in self._orders:
            n = len(self.dataset)
            order = np.random.default_rng([self.seed, 1, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}  # a batch spans <= 2 epochs
            self._orders[epoch] = order
        return self._orders[epoch]

    def global_indices(self, start: int | None = None) -> np.ndarray:
        """Sample indices of the global batch at stream position `start` (default: the next one)."""
        start = self.consumed_samples if start is None else start
        n = len(self.dataset)
        positions = np.arange(start, start + self.global_batch)
        out = np.empty(self.global_batch, dtype=np.int64)
        for epoch in np.unique(positions // n):
            here = positions // n == epoch
            out[here] = self.epoch_order(int(epoch))[positions[here] % n]
        return out

    def rank_micro_batches(self, start: int | None = None) -> list[np.ndarray]:
        """This rank's contiguous share of the global batch, cut into micro-batches."""
        share = self.global_batch // self.dp_size
        mine = self.global_indices(start)[self.dp_rank * share:(self.dp_rank + 1) * share]
        return [mine[i:i + self.micro_batch] for i in range(0, share, self.micro_batch)]

    def global_loss_tokens(self, start: int | None = None) -> int:
        return int(self.dataset.loss_tokens[self.global_indices(start)].sum())

    def next_global_batch(self) -> list[dict]:
        total = self.global_loss_tokens()
        batches = []
        for indices in self.rank_micro_batches():
            batch = collate_thd([self.dataset[int(i)] for i in indices])
            batch["global_loss_tokens"] = total
            batches.append(batch)
        self.consumed_samples += self.global_batch
        return batches

    def __iter__(self):
        while True:
            yield self.next_global_batch()

    @property
    def epoch(self) -> int:
        return self.consumed_samples // len(self.dataset)

    def state_dict(self) -> dict:
        """JSON-serialisable; independent of the data-parallel layout."""
        return {"consumed_samples": self.consumed_samples, "epoch": self.epoch, "num_samples": len(self.dataset),
                "fingerprint": self.dataset.fingerprint(), "shuffle": self.shuffle, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        here = {"num_samples": len(self.dataset), "fingerprint": self.dataset.fingerprint(),
                "shuffle": self.shuffle, "seed": self.seed}
        diff = [f"{k}: saved {state[k]!r}, now {v!r}" for k, v in here.items() if k in state and state[k] != v]
        if diff:
            raise ValueError("the data position was saved for different data or order (" + "; ".join(diff) + "); "
                             "resume with the same data config, or start the run afresh from the weights "
                             "(checkpoint.load)")
        self.consumed_samples = int(state["consumed_samples"])

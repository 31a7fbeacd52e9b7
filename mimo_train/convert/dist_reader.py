"""Read full tensors of a training checkpoint in one process, whatever layout saved it.

A training checkpoint (`mimo_train.training.checkpoint`) is megatron `dist_checkpointing` in
its torch_dist format: torch.distributed.checkpoint files whose keys are global, layout-free
names, each tensor stored as chunks written by the ranks that held them. This module reads
those files with torch's `FileSystemReader` and a planner that asks for one region of a
tensor (a whole tensor, or one expert of a stacked expert tensor), so:
- no process group and no megatron model are needed (a 309B checkpoint can be exported on
  one machine, one tensor at a time);
- only the bytes of the requested region are read (the reader seeks to each stored chunk).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from mimo_train.convert.names import ConvertError, shortlist
from mimo_train.training import checkpoint as training_checkpoint


def resolve(path: str | Path) -> Path:
    """A checkpoint directory (with `latest`) or one `iter_*` directory -> the iter directory."""
    path = Path(path)
    if not path.is_dir():
        raise ConvertError(f"checkpoint {path} does not exist")
    if (path / "latest").exists():
        try:
            found = training_checkpoint.latest(path)
        except training_checkpoint.CheckpointError as e:
            raise ConvertError(str(e)) from e
        return found
    if (path / training_checkpoint.STATE_FILE).exists():
        return path
    raise ConvertError(f"{path} is not a complete mimo-train checkpoint: no `latest` file and no "
                       f"{training_checkpoint.STATE_FILE} (pass the checkpoint dir or one complete iter_* dir)")


class _CachedReader(FileSystemReader):
    """`dcp.load` reads the metadata on every call; it is read once here."""

    def __init__(self, path: str, metadata: Metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self) -> Metadata:
        return self._metadata


class _RegionPlanner(DefaultLoadPlanner):
    """Reads `{key: [(offsets, destination tensor), ...]}`: for each region, the part of the
    stored tensor that starts at `offsets` and has the destination's shape."""

    def __init__(self, regions: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.regions = regions

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, regions in self.regions.items():
            chunks = [ChunkStorageMetadata(offsets=torch.Size(o), sizes=d.shape) for o, d in regions]
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], chunks)
        return LoadPlan(items)

    def lookup_tensor(self, index) -> torch.Tensor:
        # `index.index` is the position of the region in this key's list; the read items'
        # offsets are relative to that region's destination.
        return self.regions[index.fqn][index.index][1]


class DistCheckpoint:
    """One complete training checkpoint: its state file, model config and model tensors."""

    def __init__(self, path: str | Path):
        self.path = resolve(path)
        self.state = training_checkpoint.read_state(self.path)
        if not (self.path / ".metadata").exists():
            raise ConvertError(f"{self.path} has no .metadata: not a torch_dist checkpoint (or it was not fully copied)")
        try:
            self.metadata = FileSystemReader(str(self.path)).read_metadata()
        except Exception as e:  # a truncated or foreign .metadata fails deep inside unpickling
            raise ConvertError(f"cannot read {self.path / '.metadata'}: {e}") from e
        self._reader = _CachedReader(str(self.path), self.metadata)

    def tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Model tensors (optimizer state and non-tensor entries left out): key -> (shape, dtype)."""
        out = {}
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata) and not key.startswith("optimizer."):
                out[key] = (tuple(md.size), md.properties.dtype)
        return out

    def check_files(self, keys) -> None:
        """Every stored chunk of these keys is in a file that exists and is long enough: a
        missing or truncated .distcp file is found before anything is read or written."""
        wanted = set(keys)
        sizes: dict[str, int | None] = {}
        missing, short = set(), set()
        for index, info in self.metadata.storage_data.items():
            if index.fqn not in wanted:
                continue
            name = info.relative_path
            if name not in sizes:
                file = self.path / name
                sizes[name] = os.path.getsize(file) if file.exists() else None
            if sizes[name] is None:
                missing.add(name)
            elif sizes[name] < info.offset + info.length:
                short.add(name)
        if missing or short:
            raise ConvertError(
                f"checkpoint {self.path} is incomplete: "
                + (f"missing file(s) {shortlist(sorted(missing))}" if missing else "")
                + ("; " if missing and short else "")
                + (f"truncated file(s) {shortlist(sorted(short))}" if short else ""))

    def read(self, requests: dict[tuple[str, int | None], torch.dtype | None]) -> dict[tuple[str, int | None], torch.Tensor]:
        """Read several regions in one pass over the files. A request is (key, None) for a whole
        tensor or (key, i) for element i of the leading axis (one expert of a stacked tensor);
        the value is the dtype to read into (None: the stored dtype)."""
        regions: dict[str, list] = {}
        results = {}
        for (key, index), dtype in requests.items():
            md = self.metadata.state_dict_metadata.get(key)
            if not isinstance(md, TensorStorageMetadata):
                raise ConvertError(f"checkpoint {self.path} has no tensor {key!r}")
            size = tuple(md.size)
            if index is None:
                offsets, shape = (0,) * len(size), size
            else:
                if not 0 <= index < size[0]:
                    raise ConvertError(f"{key}: index {index} out of range for shape {size}")
                offsets, shape = (index,) + (0,) * (len(size) - 1), (1, *size[1:])
            dest = torch.empty(shape, dtype=dtype or md.properties.dtype)
            regions.setdefault(key, []).append((offsets, dest))
            results[(key, index)] = dest if index is None else dest[0]
        if not regions:
            return results
        try:
            with warnings.catch_warnings():  # no_dist is the point here, not a fallback to warn about
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load({k: v[0][1] for k, v in regions.items()}, storage_reader=self._reader,
                         planner=_RegionPlanner(regions), no_dist=True)
        except Exception as e:
            raise ConvertError(f"cannot read {shortlist(sorted(regions), 3)} from {self.path}: {e}") from e
        return results

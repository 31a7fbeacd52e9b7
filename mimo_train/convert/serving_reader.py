"""A serving-format directory (ours, the FP8 release, or transformers' `save_pretrained`) as
a source of full tensors under our names, checked completely before any tensor is read.

The checks read only the safetensors headers: every shard named by the index exists, no
shard is truncated, the index and the shards agree, the names are exactly the model's, and
every shape matches config.json. FP8 (e4m3) weights are dequantised with their block scales
(`<name>_scale_inv`, block size from `quantization_config`) when read.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from mimo_train.convert import fp8
from mimo_train.convert.names import ConvertError, hf_shapes, shortlist
from mimo_train.model.config import ModelConfig
from mimo_train.model.hf_mapping import name_pairs
from mimo_train.model.load import config_for_weights, safetensors_files

SCALE_SUFFIX = fp8.SCALE_SUFFIX


def read_header(file: Path) -> dict:
    """A safetensors file's header {name: {dtype, shape, data_offsets}}, after checking that
    the file holds all the bytes the header promises (a truncated copy is caught here, not
    halfway through a conversion)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{file} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ConvertError(f"{file} is truncated or not a safetensors file (header of {n} bytes in {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ConvertError(f"{file} is not a safetensors file (unreadable header: {e})") from e
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if size < 8 + n + end:
        raise ConvertError(f"{file} is truncated: {size} bytes, the header describes {8 + n + end}")
    return header


class ServingSource:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            files = safetensors_files(self.path)
        except (FileNotFoundError, ValueError) as e:
            raise ConvertError(str(e)) from e
        self.where: dict[str, Path] = {}
        self.header: dict[str, dict] = {}
        for file in files:
            for name, info in read_header(file).items():
                if name in self.where:
                    raise ConvertError(f"{name} is stored twice, in {self.where[name].name} and {file.name}")
                self.where[name], self.header[name] = file, info
        self._check_index(files)
        if not (self.path / "config.json").exists():
            raise ConvertError(f"no config.json in {self.path}")
        raw = json.loads((self.path / "config.json").read_text())
        try:
            self.config: ModelConfig = config_for_weights(self.path, dict.fromkeys(self.where))
        except (ValueError, TypeError) as e:
            raise ConvertError(f"{self.path / 'config.json'}: {e}") from e
        self.fp8 = sorted(n for n, h in self.header.items() if h["dtype"] == "F8_E4M3")
        other = sorted(f"{n} ({h['dtype']})" for n, h in self.header.items()
                       if h["dtype"].startswith("F8_") and h["dtype"] != "F8_E4M3")
        if other:
            raise ConvertError(f"{self.path}: {len(other)} float8 weight(s) in a format other than e4m3: "
                               f"{shortlist(other)}; only block FP8 e4m3 is dequantised: {fp8.FIX}")
        self.block = None
        quant = raw.get("quantization_config")
        if self.fp8 or (quant and quant.get("quant_method") != "fp8"):
            try:
                self.block = fp8.block_size(quant)
            except ValueError as e:
                raise ConvertError(f"{self.path}: {e}") from e
        self._open: dict[Path, object] = {}

    def _check_index(self, files: list[Path]) -> None:
        index = self.path / "model.safetensors.index.json"
        if not index.exists():
            return
        weight_map = json.loads(index.read_text())["weight_map"]
        wrong = sorted(n for n, f in weight_map.items() if n not in self.where or self.where[n].name != f)
        unlisted = sorted(set(self.where) - set(weight_map))
        if wrong or unlisted:
            raise ConvertError(
                f"{index} does not match the shards: "
                + (f"{len(wrong)} name(s) not in the file the index names: {shortlist(wrong)}" if wrong else "")
                + ("; " if wrong and unlisted else "")
                + (f"{len(unlisted)} stored name(s) missing from the index: {shortlist(unlisted)}" if unlisted else ""))

    def check(self, *, mtp: bool = True) -> None:
        """Names and shapes against config.json; one error lists every problem found."""
        expected = hf_shapes(self.config, mtp=mtp)
        scales = {n + SCALE_SUFFIX for n in self.fp8}
        stored = {n for n in self.where if n not in scales}
        unknown = sorted(n for n in stored - set(expected) if mtp or not n.startswith("model.mtp."))
        missing = sorted(set(expected) - stored)
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing weight(s): {shortlist(missing)}")
        if unknown:
            problems.append(f"{len(unknown)} unknown weight(s): {shortlist(unknown)}")
        bad = [f"{n}: stored {tuple(self.header[n]['shape'])}, config.json implies {expected[n]}"
               for n in sorted(stored & set(expected)) if tuple(self.header[n]["shape"]) != expected[n]]
        if bad:
            problems.append(f"{len(bad)} shape mismatch(es) (config.json and weights disagree): {shortlist(bad, 6)}")
        for n in self.fp8:
            scale = n + SCALE_SUFFIX
            if scale not in self.where:
                problems.append(f"{n} is float8 but {scale} is missing")
            elif tuple(self.header[scale]["shape"]) != fp8.scale_shape(tuple(self.header[n]["shape"]), self.block):
                problems.append(f"{scale} has shape {tuple(self.header[scale]['shape'])}, expected "
                                f"{fp8.scale_shape(tuple(self.header[n]['shape']), self.block)} for block {self.block}")
        orphans = sorted(n for n in self.where if n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] not in self.fp8)
        if orphans:
            problems.append(f"scale(s) without a float8 weight: {shortlist(orphans)}")
        if problems:
            scales = any(SCALE_SUFFIX in p for p in problems)
            fix = f" (FP8 scales do not match their weights: {fp8.FIX})" if scales else ""
            raise ConvertError(f"{self.path} does not match its config.json: " + "; ".join(problems) + fix)

    def _tensor(self, name: str) -> torch.Tensor:
        file = self.where[name]
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt")
        try:
            return self._open[file].get_tensor(name)
        except Exception as e:
            raise ConvertError(f"cannot read {name} from {file}: {e}") from e

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One serving tensor, dequantised if it is FP8."""
        t = self._tensor(name)
        if t.dtype == fp8.FP8:
            return fp8.dequantize(t, self._tensor(name + SCALE_SUFFIX), self.block, dtype)
        return t.to(dtype)

    def ours(self, mtp: bool = True):
        """ours name -> a function reading that full tensor (gate and up concatenated)."""
        readers = {}
        for o, hf in name_pairs(self.config, mtp=mtp):
            if isinstance(hf, tuple):
                readers[o] = lambda dtype=torch.float32, hf=hf: torch.cat([self.get(hf[0], dtype), self.get(hf[1], dtype)])
            else:
                readers[o] = lambda dtype=torch.float32, hf=hf: self.get(hf, dtype)
        return readers

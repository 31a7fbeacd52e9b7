"""The files of a serving-format directory besides the weights: config.json with the hub
field names, generation_config.json, the tokenizer, the shard plan and the index.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from mimo_train.convert import fp8
from mimo_train.convert.names import ConvertError
from mimo_train.model.config import ModelConfig

INDEX = "model.safetensors.index.json"
# What transformers' tokenizers read; copied when present. A whitelist, so pointing --tokenizer
# at a whole model directory never copies its config.json or weights over ours.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes (decimal units, as transformers' max_shard_size), '512MiB' -> binary."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise ConvertError(f"cannot read shard size {text!r}: use e.g. 5GB, 500MB or 2GiB")
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise ConvertError(f"shard size must be positive, got {text!r}")
    return size


def plan_shards(sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive groups of entries, each at most `limit` bytes unless one entry alone is larger
    (it gets a shard of its own, as transformers does)."""
    shards: list[list[int]] = []
    current, total = [], 0
    for i, size in enumerate(sizes):
        if current and total + size > limit:
            shards.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    if current:
        shards.append(current)
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def hub_config(cfg: ModelConfig, *, dtype: str, mtp: bool, fp8_block: tuple[int, int] | None) -> dict:
    hub = cfg.to_hub_dict()
    hub["torch_dtype"] = TORCH_DTYPE_NAMES[dtype]
    if not mtp:  # the export has no MTP weights: engines must not look for a draft model in it
        hub["num_nextn_predict_layers"] = 0
    if fp8_block:
        hub["quantization_config"] = fp8.quantization_config(fp8_block)
    return hub


def generation_config(cfg: ModelConfig) -> dict:
    ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def tokenizer_files(directory: str | Path) -> list[Path]:
    """The tokenizer files to copy; checked before the export starts."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConvertError(f"tokenizer directory {directory} does not exist")
    files = [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]
    if not files:
        raise ConvertError(f"{directory} holds no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    return files


def write_metadata(directory: Path, cfg: ModelConfig, *, dtype: str, mtp: bool, fp8_block, tokenizer: list[Path],
                   weight_map: dict[str, str], total_size: int) -> None:
    (directory / "config.json").write_text(
        json.dumps(hub_config(cfg, dtype=dtype, mtp=mtp, fp8_block=fp8_block), indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2) + "\n")
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map},
                                              indent=2) + "\n")
    for file in tokenizer:
        shutil.copy2(file, directory / file.name)

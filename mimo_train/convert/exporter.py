"""Training checkpoint (any TP/PP/EP/DP layout) -> serving-format directory, in one process.

Everything that can be checked is checked first, from the checkpoint's metadata and state
file alone: the model config against the stored keys and shapes, every data file present and
long enough, the tokenizer directory, the output path. Then the weights stream shard by shard
(only one output shard's tensors in memory, each read as one region of the stored tensor) into
`<out>.tmp`, which becomes `<out>` only when complete (and verified, with `verify=True`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from mimo_train.convert import atomic, fp8, serving
from mimo_train.convert.dist_reader import DistCheckpoint
from mimo_train.convert.names import DTYPES, ConvertError, dist_key, dist_shapes, fp8_eligible, shortlist
from mimo_train.model.config import ModelConfig
from mimo_train.model.hf_mapping import name_pairs

# The router's bias only ranks experts (top-k on score + bias): rounding it to bf16 can swap
# near-tied experts, and it is tiny, so it stays fp32 whatever --dtype says.
KEEP_FP32 = (".mlp.gate.e_score_correction_bias",)


@dataclass
class Entry:
    """One output tensor: read `key` (element `index` of a stacked expert tensor), take `half`
    (0 = gate, 1 = up of a fused fc1) or all of it."""
    hf: str
    key: str
    index: int | None
    half: int | None
    shape: tuple[int, ...]
    fp8: bool

    def nbytes(self, dtype: torch.dtype, block) -> int:
        n = 1
        for s in self.shape:
            n *= s
        if self.fp8:
            rows, cols = fp8.scale_shape(self.shape, block)
            return n + 4 * rows * cols
        itemsize = 4 if self.hf.endswith(KEEP_FP32) else torch.empty((), dtype=dtype).element_size()
        return n * itemsize


def plan(cfg: ModelConfig, *, mtp: bool, quantize: bool) -> list[Entry]:
    shapes = dist_shapes(cfg, mtp=mtp)
    entries = []
    for ours, hf in name_pairs(cfg, mtp=mtp):
        key, index = dist_key(ours)
        full = shapes[key][1:] if index is not None else shapes[key]
        parts = [(hf[0], 0), (hf[1], 1)] if isinstance(hf, tuple) else [(hf, None)]
        for name, half in parts:
            shape = (full[0] // 2, *full[1:]) if half is not None else tuple(full)
            entries.append(Entry(name, key, index, half, shape, quantize and fp8_eligible(name, shape)))
    return entries


def model_config(ck: DistCheckpoint) -> ModelConfig:
    try:
        return ModelConfig.from_dict(ck.state["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"{ck.path}: the model config in the state file is unusable: {e}") from e


def check_against_config(ck: DistCheckpoint, cfg: ModelConfig, mtp: bool) -> list[str]:
    """The stored keys and shapes against the config; returns the keys to read."""
    stored = ck.tensors()
    expected = dist_shapes(cfg, mtp=mtp)
    missing = sorted(set(expected) - set(stored))
    unknown = sorted(k for k in set(stored) - set(expected) if mtp or not k.startswith("mtp."))
    bad = [f"{k}: stored {stored[k][0]}, config implies {expected[k]}"
           for k in sorted(set(expected) & set(stored)) if stored[k][0] != expected[k]]
    problems = ([f"{len(missing)} missing tensor(s): {shortlist(missing)}"] if missing else []) \
        + ([f"{len(unknown)} tensor(s) the config does not describe: {shortlist(unknown)}"] if unknown else []) \
        + ([f"{len(bad)} shape mismatch(es): {shortlist(bad, 6)}"] if bad else [])
    if problems:
        raise ConvertError(f"checkpoint {ck.path} does not match its model config: " + "; ".join(problems))
    return sorted(expected)


def _convert(entry: Entry, tensor: torch.Tensor, dtype: torch.dtype, block) -> dict[str, torch.Tensor]:
    if entry.half is not None:
        tensor = torch.chunk(tensor, 2, dim=0)[entry.half]
    if entry.fp8:
        q, scale = fp8.quantize(tensor, block)
        return {entry.hf: q, entry.hf + fp8.SCALE_SUFFIX: scale}
    out_dtype = torch.float32 if entry.hf.endswith(KEEP_FP32) else dtype
    return {entry.hf: tensor.to(out_dtype).contiguous()}


def write_shards(ck: DistCheckpoint, entries: list[Entry], directory: Path, *, dtype: torch.dtype, block,
                 shard_size: int, progress: bool) -> tuple[dict[str, str], int]:
    sizes = [e.nbytes(dtype, block) for e in entries]
    shards = serving.plan_shards(sizes, shard_size)
    weight_map = {}
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="export", disable=not progress) as bar:
        for i, members in enumerate(shards):
            name = serving.shard_name(i, len(shards))
            wanted = {(entries[j].key, entries[j].index): None for j in members}
            read = ck.read(wanted)
            tensors = {}
            for j in members:
                e = entries[j]
                tensors.update(_convert(e, read[(e.key, e.index)], dtype, block))
                bar.update(sizes[j])
            save_file(tensors, str(directory / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            del read, tensors  # one shard at a time in memory
    return weight_map, sum(sizes)


def export_checkpoint(ckpt: str | Path, out: str | Path, *, dtype: str = "bf16", shard_size: str | int = "5GB",
                      mtp: bool = True, quantize_fp8: bool = False, fp8_block: tuple[int, int] = fp8.DEFAULT_BLOCK,
                      tokenizer: str | Path | None = None, verify: bool = False, verify_tol: float | None = None,
                      overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Write the serving directory; returns a summary (and the verification's numbers)."""
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    limit = serving.parse_size(shard_size)
    ck = DistCheckpoint(ckpt)
    cfg = model_config(ck)
    keys = check_against_config(ck, cfg, mtp)
    ck.check_files(keys)
    tokenizer_files = serving.tokenizer_files(tokenizer) if tokenizer is not None else []
    out = atomic.check_output(out, overwrite)
    block = tuple(fp8_block) if quantize_fp8 else None
    entries = plan(cfg, mtp=mtp, quantize=quantize_fp8)

    start = time.time()
    with atomic.output(out) as tmp:  # complete or absent: never a partial export
        weight_map, total = write_shards(ck, entries, tmp, dtype=DTYPES[dtype], block=block, shard_size=limit,
                                         progress=progress)
        serving.write_metadata(tmp, cfg, dtype=dtype, mtp=mtp, fp8_block=block, tokenizer=tokenizer_files,
                               weight_map=weight_map, total_size=total)
        summary = {"checkpoint": str(ck.path), "out": str(out), "step": ck.state.get("step"), "tensors": len(weight_map),
                   "shards": len(set(weight_map.values())), "bytes": total, "dtype": dtype, "fp8": quantize_fp8,
                   "mtp_layers": cfg.num_nextn_predict_layers if mtp else 0,
                   "tokenizer_files": [f.name for f in tokenizer_files]}
        if verify:
            from mimo_train.convert.verify import verify_export  # megatron + transformers: only when asked

            summary["verify"] = check_verification(verify_export(tmp, ck.path, cfg), verify_tol, out, log)
    summary["seconds"] = round(time.time() - start, 2)
    return summary


def check_verification(result: dict, verify_tol: float | None, out: Path, log) -> dict:
    """Report a verification (`verify_export`'s result) and refuse the export above the tolerance."""
    log(f"verify ({result['reference']}): max |logit difference| = {result['max_abs_diff']:.3e} "
        f"over {result['prompts']} prompts of {result['seq_len']} tokens")
    if verify_tol is not None and not result["max_abs_diff"] <= verify_tol:
        raise ConvertError(f"verification failed: max logit difference {result['max_abs_diff']:.3e} "
                           f"> tolerance {verify_tol:g}; nothing was written to {out}")
    return result

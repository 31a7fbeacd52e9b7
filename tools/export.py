"""Export a training checkpoint (any TP/PP/EP/DP layout, or DeepSpeed ZeRO) to the serving format, in one process.

    python tools/export.py --ckpt runs/x/checkpoints --out export/x --tokenizer data/tokenizer
    python tools/export.py --ckpt runs/x/checkpoints/iter_0000040 --out export/x-fp8 --fp8 --tokenizer T
    python tools/export.py --ckpt C --out O --dtype fp32 --no-tokenizer --verify
    python tools/export.py --ckpt runs/ds/checkpoints --out export/ds          # a trainer=deepspeed run

The backend comes from the checkpoint's mimo_state.json.

megatron: writes OUT/config.json (hub field names), model-0000i-of-0000n.safetensors +
model.safetensors.index.json, generation_config.json and the tokenizer files, MTP layers under
model.mtp.layers.* (unless --no-mtp). --tokenizer or --no-tokenizer is required.

deepspeed (trainer=deepspeed, ZeRO-2/3, any number of ranks): the ZeRO shards consolidated on
CPU by DeepSpeed's zero_to_fp32 (weights-only loads), the student's architecture from the
config.json of the directory the run started from (--student DIR when that directory is gone),
written by transformers' save_pretrained (safetensors). Without --tokenizer / --no-tokenizer the
tokenizer is the run's data.tokenizer, as its state file records it. --fp8 does not apply (the
FP8 block format is the MiMo serving format's).

Either way, input problems are reported before anything is written, and the output appears only
when complete (it is written to OUT.tmp and renamed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mimo_train.convert import ConvertError, export_checkpoint, zero_export  # noqa: E402


def _block(text: str) -> tuple[int, int]:
    parts = [int(x) for x in text.replace("x", ",").split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"block size must be N or RxC with positive ints, got {text!r}")
    return parts[0], parts[1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint dir (with `latest`) or one iter_* dir")
    p.add_argument("--out", required=True, help="serving directory to create")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the unquantised weights")
    p.add_argument("--shard-size", default="5GB", help="largest shard (5GB, 500MB, 2GiB, ...)")
    p.add_argument("--no-mtp", action="store_true", help="leave the MTP layers out (config says 0 MTP layers)")
    p.add_argument("--fp8", action="store_true", help="block-wise FP8 e4m3 projection weights, as the release")
    p.add_argument("--fp8-block", type=_block, default=(128, 128), help="FP8 block size (default 128x128)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", help="directory with the tokenizer files (the run's data.tokenizer; "
                                         "a DeepSpeed checkpoint's default: the one its state file names)")
    tok.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    p.add_argument("--student", help="DeepSpeed checkpoints: a directory with the student's config.json, when the "
                                     "one the run started from (recorded in the checkpoint) is gone")
    p.add_argument("--verify", action="store_true",
                   help="reload the export (transformers when it can) and print the max logit difference "
                        "with the training model (DeepSpeed: with the consolidated fp32 weights)")
    p.add_argument("--verify-tol", type=float, default=None,
                   help="fail (and write nothing) if the max logit difference exceeds this "
                        "(default: 1e-3 for --dtype fp32 without --fp8, otherwise only printed)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    tol = a.verify_tol
    if tol is None and a.dtype == "fp32" and not a.fp8:
        tol = 1e-3
    try:
        path, state = zero_export.read_checkpoint(a.ckpt)
        if zero_export.is_deepspeed(state):
            summary = _export_deepspeed(a, path, state, tol)
        else:
            if a.student is not None:
                raise ConvertError(f"--student is for DeepSpeed checkpoints; {path} was saved by the megatron "
                                   "backend, whose state file holds the model config")
            if a.tokenizer is None and not a.no_tokenizer:
                p.error("one of the arguments --tokenizer --no-tokenizer is required for a megatron checkpoint")
            summary = export_checkpoint(
                a.ckpt, a.out, dtype=a.dtype, shard_size=a.shard_size, mtp=not a.no_mtp, quantize_fp8=a.fp8,
                fp8_block=a.fp8_block, tokenizer=None if a.no_tokenizer else a.tokenizer, verify=a.verify,
                verify_tol=tol, overwrite=a.overwrite, progress=not a.no_progress)
    except ConvertError as e:
        raise SystemExit(f"export: error: {e}") from None
    print(json.dumps(summary))
    return summary


def _export_deepspeed(a, path: Path, state: dict, tol: float | None) -> dict:
    if a.fp8:
        raise ConvertError(f"{path} is a DeepSpeed checkpoint of a transformers student, which is written as "
                           "transformers writes it; --fp8 is the MiMo serving format's (megatron checkpoints): "
                           "drop --fp8")
    if a.no_tokenizer:
        tokenizer = None
    else:
        tokenizer = a.tokenizer if a.tokenizer is not None else zero_export.default_tokenizer(path, state)
    return zero_export.export_deepspeed(
        path, a.out, dtype=a.dtype, shard_size=a.shard_size, tokenizer=tokenizer, student=a.student, verify=a.verify,
        verify_tol=tol, overwrite=a.overwrite, progress=not a.no_progress)


if __name__ == "__main__":
    main(sys.argv[1:])

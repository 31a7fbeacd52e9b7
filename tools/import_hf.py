"""Import a serving-format directory (ours, the FP8 release, or a transformers save_pretrained
directory) as a weights-only training checkpoint for `checkpoint.load=<out>`.

    python tools/import_hf.py --hf export/x --out ckpt/x
    torchrun --nproc-per-node 4 tools/import_hf.py --hf HF --out OUT --tp 2 --pp 2

FP8 (e4m3) weights are dequantised with their block scales (`*.weight_scale_inv`, block size
from config.json's quantization_config). Writes OUT/latest and OUT/iter_0000000/ (megatron
dist_checkpointing + mimo_state.json); every input problem is reported before anything is
written, and OUT appears only when complete. The layout only spreads memory over ranks: the
checkpoint loads under any layout.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mimo_train.convert import ConvertError, import_serving  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", required=True, help="serving-format or save_pretrained directory")
    p.add_argument("--out", required=True, help="training checkpoint directory to create")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="dtype of the stored weights (fp32 keeps dequantised FP8 exact)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    a = p.parse_args(argv)
    quiet = int(os.environ.get("RANK", "0")) != 0
    try:
        return import_serving(a.hf, a.out, tp=a.tp, pp=a.pp, ep=a.ep, vpp=a.vpp, dtype=a.dtype,
                              overwrite=a.overwrite, log=(lambda *x: None) if quiet else print)
    except ConvertError as e:
        raise SystemExit(f"import_hf: error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])

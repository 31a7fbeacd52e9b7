"""Block-wise FP8 (e4m3) weights, in the layout of the FP8 release (DeepSeek-V3's convention).

A weight [out, in] is cut into blocks of `block = (b0, b1)` (128x128 in the release; edge
blocks may be smaller). Each block has one fp32 scale `s = amax(|block|) / 448`, stored as
`<name>_scale_inv` with shape [ceil(out/b0), ceil(in/b1)]; the stored value is `w / s` in e4m3
and the weight is recovered as `q * s` (`scale_inv` is the factor that *undoes* the scaling,
hence the name). `quantization_config` in config.json names the format and the block size.

Error bound (what tests hold the round trip to): `w / s` lies in [-448, 448]. e4m3 has 3
mantissa bits, so rounding to nearest changes a normal value x (|x| >= 2^-6) by at most half
a unit in the last place, <= 2^-4 |x|; below 2^-6 the spacing is 2^-9 (subnormals), an error
<= 2^-10. Multiplying back by s: |w - q s| <= max(2^-4 |w|, 2^-10 s), up to fp32 rounding of
the division and the product (relative 2^-23).

Loading: every reader of a serving directory (`tools/import_hf.py` through `ServingSource`;
`load_hf`, `Engine.from_pretrained`, the teachers, `tools/serve_teacher.py` and
`tools/evaluate.py` through `model.load.read_weights`) dequantises FP8 weights when it reads
them, with `dequantize` below: the one rule. The weights are not kept in FP8 on the device
because nothing here multiplies by FP8 weights: megatron's layers and the rollout engine's
matmuls take bf16/fp32 operands (and CPUs have no FP8 matmul at all), so the loaded model is
the dequantised one, in the loader's dtype, with the memory of that dtype. vLLM, as a rollout
or teacher backend, reads the same directory itself and can keep it FP8 on GPUs that support it.
"""

from __future__ import annotations

import json
import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
DEFAULT_BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"  # `<weight name>_scale_inv` holds that weight's block scales
# What to do when a directory cannot be dequantised here; appended to the refusals below.
FIX = ("export it again from its training checkpoint (python tools/export.py, with --fp8 for block FP8), or convert "
       "it to bf16 with the tool that quantised it")


def quantization_config(block: tuple[int, int] = DEFAULT_BLOCK) -> dict:
    """config.json's `quantization_config` for weights written by `quantize`."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [int(block[0]), int(block[1])]}


def block_size(quant: dict | None) -> tuple[int, int]:
    """The block size a `quantization_config` describes; errors name what is unsupported."""
    if not quant:
        raise ValueError("the checkpoint holds float8 weights but config.json has no quantization_config, so their "
                         "block size is unknown: add the quantization_config of the model that was quantised (e.g. "
                         f"{json.dumps(quantization_config())}), or {FIX}")
    method = quant.get("quant_method")
    if method != "fp8":
        raise ValueError(f"quantization_config.quant_method is {method!r}; only block FP8 ('fp8', e4m3 with "
                         f"weight_scale_inv) is dequantised on load: {FIX}")
    if quant.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"quantization_config.fmt is {quant.get('fmt')!r}; only e4m3 is dequantised on load: {FIX}")
    size = quant.get("weight_block_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(x, int) and x > 0 for x in size)):
        raise ValueError(f"quantization_config.weight_block_size must be two positive ints, got {size!r} "
                         f"(per-tensor FP8 is not supported): {FIX}")
    return int(size[0]), int(size[1])


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"block FP8 needs a 2-D weight, got shape {tuple(shape)}")
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """One scale per element: each block's scale repeated over the block, edges cut off."""
    return scale.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def quantize(weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (e4m3 values [out, in], fp32 scale_inv [ceil(out/b0), ceil(in/b1)])."""
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantise a weight with non-finite values")
    rows, cols = scale_shape(tuple(w.shape), block)
    padded = torch.zeros(rows * block[0], cols * block[1], dtype=torch.float32)
    padded[: w.shape[0], : w.shape[1]] = w  # zero padding never raises a block's amax
    amax = padded.view(rows, block[0], cols, block[1]).abs().amax(dim=(1, 3))
    # An all-zero block gets scale 1 (any scale represents it exactly) instead of 0, so
    # dequantisation never multiplies by zero-from-underflow or divides by zero here.
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / _expand(scale, tuple(w.shape), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e4m3 values and their block scales -> the weight, computed in fp32."""
    if q.dtype != FP8:
        raise ValueError(f"expected a float8_e4m3fn weight, got {q.dtype}")
    expected = scale_shape(tuple(q.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight {tuple(q.shape)} with block {tuple(block)} needs scale_inv of shape {expected}, "
                         f"got {tuple(scale_inv.shape)}")
    w = q.to(torch.float32) * _expand(scale_inv.to(torch.float32), tuple(q.shape), block)
    return w.to(dtype)



def dequantize_state(tensors: dict[str, torch.Tensor], quant: dict | None) -> dict[str, torch.Tensor]:
    """A serving directory's tensors with every e4m3 weight replaced by its fp32 dequantisation
    (`dequantize` with its `<name>_scale_inv` and the block of `quant`, config.json's
    `quantization_config`) and the scales dropped; other tensors are passed through unchanged.
    One ValueError lists every problem (other float8 formats, missing or mis-shaped scales,
    scales without a float8 weight); nothing half-dequantised is returned."""
    if quant and quant.get("quant_method") != "fp8":
        block_size(quant)  # another quantisation (AWQ, GPTQ, ...): refused, naming it
    e4m3 = sorted(n for n, t in tensors.items() if t.dtype == FP8)
    other = sorted(f"{n} ({t.dtype})" for n, t in tensors.items()
                   if t.dtype != FP8 and t.is_floating_point() and t.element_size() == 1)
    scales = {n + SCALE_SUFFIX for n in e4m3}
    orphans = sorted(n for n in tensors if n.endswith(SCALE_SUFFIX) and n not in scales)
    missing = sorted(s for s in scales if s not in tensors)
    problems = []
    if other:
        problems.append(f"{len(other)} float8 weight(s) in a format other than e4m3: {_few(other)}")
    if missing:
        problems.append(f"{len(missing)} float8 weight(s) without their block scales: {_few(missing)} missing")
    if orphans:
        problems.append(f"{len(orphans)} scale(s) without a float8 weight: {_few(orphans)}")
    if not problems and not e4m3:
        return tensors
    out = {}
    if not problems:
        block = block_size(quant)  # raises naming what config.json lacks
        for n, t in tensors.items():
            if n in scales:
                continue
            try:
                out[n] = dequantize(t, tensors[n + SCALE_SUFFIX], block) if n in e4m3 else t
            except ValueError as e:  # a scale of the wrong shape
                problems.append(f"{n}: {e}")
    if problems:
        raise ValueError("cannot dequantise the FP8 weights: " + "; ".join(problems) + ". The directory is damaged "
                         f"or not block FP8 as tools/export.py --fp8 and the FP8 release write it: {FIX}")
    return out


def _few(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" ... and {len(names) - limit} more" if len(names) > limit else "")

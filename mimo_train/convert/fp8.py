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
"""

from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
DEFAULT_BLOCK = (128, 128)


def quantization_config(block: tuple[int, int] = DEFAULT_BLOCK) -> dict:
    """config.json's `quantization_config` for weights written by `quantize`."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [int(block[0]), int(block[1])]}


def block_size(quant: dict | None) -> tuple[int, int]:
    """The block size a `quantization_config` describes; errors name what is unsupported."""
    if not quant:
        raise ValueError("the checkpoint holds float8 weights but config.json has no quantization_config")
    method = quant.get("quant_method")
    if method != "fp8":
        raise ValueError(f"quantization_config.quant_method is {method!r}; only 'fp8' can be dequantised")
    if quant.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"quantization_config.fmt is {quant.get('fmt')!r}; only e4m3 is supported")
    size = quant.get("weight_block_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(x, int) and x > 0 for x in size)):
        raise ValueError(f"quantization_config.weight_block_size must be two positive ints, got {size!r} "
                         "(per-tensor FP8 is not supported)")
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


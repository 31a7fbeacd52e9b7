"""Block FP8 (e4m3): dequantisation against a reference written here (e4m3 decoded from its bits,
one block at a time), and the export --fp8 -> import round trip held to the block-FP8 bound.

The bound, per element of a weight w quantised with block scale s = amax(|block|) / 448:
    |w - dequant(quant(w))| <= max(2^-4 |w|, 2^-10 s)
because w/s lies in [-448, 448] and e4m3 has 3 mantissa bits: a normal value x (|x| >= 2^-6)
rounds to nearest with error <= half an ulp = 2^(floor(log2|x|) - 4) <= 2^-4 |x|; below 2^-6
values are subnormal with spacing 2^-9, an error <= 2^-10; scaling back by s multiplies both.
The fp32 division and product add relative 2^-23 at most, covered by a (1 + 2^-20) factor.
"""

import json
import math

import pytest
import torch
from safetensors import safe_open

from mimo_train.convert import export_checkpoint, fp8, import_serving
from mimo_train.convert.dist_reader import DistCheckpoint
from tests.convert.test_roundtrip import all_tensors

BLOCK = (32, 48)  # not square and not dividing every tiny-model shape: edge blocks are exercised


def e4m3_decode(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn bits -> values (float64): sign, 4 exponent bits (bias 7), 3 mantissa bits;
    exponent 0 is subnormal (m/8 * 2^-6); S.1111.111 is NaN (never produced by quantisation)."""
    b = q.view(torch.uint8).to(torch.int64)
    sign = torch.where((b >> 7) == 1, -1.0, 1.0).double()
    exp, man = (b >> 3) & 0xF, (b & 7).double()
    value = torch.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * torch.pow(2.0, (exp - 7).double()))
    return torch.where((exp == 15) & (man == 7), torch.nan, sign * value)


def reference_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block) -> torch.Tensor:
    values = e4m3_decode(q)
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(math.ceil(q.shape[0] / block[0])):
        for j in range(math.ceil(q.shape[1] / block[1])):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = values[rows, cols] * float(scale_inv[i, j])
    return out.float()  # the float64 product is exact; one rounding, as fp32 multiplication


def reference_scales(w: torch.Tensor, block) -> torch.Tensor:
    rows, cols = math.ceil(w.shape[0] / block[0]), math.ceil(w.shape[1] / block[1])
    s = torch.zeros(rows, cols, dtype=torch.float64)
    for i in range(rows):
        for j in range(cols):
            s[i, j] = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].abs().max().double() / 448
    return s


def bound(w: torch.Tensor, block) -> torch.Tensor:
    s = reference_scales(w, block)
    s = s.repeat_interleave(block[0], 0)[: w.shape[0]].repeat_interleave(block[1], 1)[:, : w.shape[1]]
    return torch.maximum(w.double().abs() * 2.0**-4, s * 2.0**-10) * (1 + 2.0**-20)


def sample_weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    # A wide dynamic range (1e-6 .. 10) so some blocks have subnormal-range values, and one
    # all-zero block.
    w = torch.randn(shape, generator=g) * torch.exp(torch.empty(shape).uniform_(-14, 2, generator=g))
    w[:16, :16] = 0
    return w


@pytest.mark.parametrize("shape,block", [((100, 70), (32, 16)), ((128, 256), (128, 128)), ((7, 300), (4, 128))])
def test_dequantize_matches_the_reference(shape, block):
    w = sample_weight(shape, seed=shape[0])
    q, scale_inv = fp8.quantize(w, block)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32
    assert tuple(scale_inv.shape) == (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    nonzero = reference_scales(w, block) > 0
    assert torch.allclose(scale_inv.double()[nonzero], reference_scales(w, block)[nonzero], rtol=1e-6, atol=0)
    assert torch.equal(fp8.dequantize(q, scale_inv, block), reference_dequantize(q, scale_inv, block))
    # A release-style weight quantised elsewhere (plain torch cast, any scales) dequantises the same.
    g = torch.Generator().manual_seed(1)
    foreign_q = (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    foreign_s = torch.rand(scale_inv.shape, generator=g) * 1e-2
    assert torch.equal(fp8.dequantize(foreign_q, foreign_s, block), reference_dequantize(foreign_q, foreign_s, block))


def test_quantisation_error_is_within_the_block_fp8_bound():
    w = sample_weight((200, 150), seed=3)
    q, scale_inv = fp8.quantize(w, BLOCK)
    err = (fp8.dequantize(q, scale_inv, BLOCK).double() - w.double()).abs()
    b = bound(w, BLOCK)
    assert (err <= b).all()
    assert (err / b.clamp_min(1e-300)).max() > 0.5  # the bound is tight, not vacuous
    assert err[:16, :16].max() == 0  # the zero block stays exactly zero


def test_block_size_comes_from_quantization_config():
    assert fp8.block_size({"quant_method": "fp8", "weight_block_size": [128, 64]}) == (128, 64)
    for bad, why in [(None, "no quantization_config"), ({"quant_method": "awq"}, "awq"),
                     ({"quant_method": "fp8"}, "weight_block_size")]:
        with pytest.raises(ValueError, match=why):
            fp8.block_size(bad)


def test_fp8_export_import_round_trip(trained, tmp_path, megatron_single):
    out, back = tmp_path / "fp8", tmp_path / "fp8_imported"
    summary = export_checkpoint(trained, out, dtype="fp32", quantize_fp8=True, fp8_block=BLOCK, progress=False,
                                verify=True, log=print)
    # transformers cannot dequantise on CPU: --verify reads FP8 exports back with our loader, and
    # the logits move by the quantisation error only.
    assert summary["verify"]["reference"] == "mimo_train loader (FP8 weights)"
    assert 0 < summary["verify"]["max_abs_diff"] < 0.1
    hub = json.loads((out / "config.json").read_text())
    assert hub["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": list(BLOCK)}
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    scales = {n for n in index if n.endswith("_scale_inv")}
    assert scales and all(n.removesuffix("_scale_inv").endswith("_proj.weight") for n in scales)
    with safe_open(str(out / index["model.layers.1.mlp.experts.0.gate_proj.weight"]), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.experts.0.gate_proj.weight").dtype == torch.float8_e4m3fn
    with safe_open(str(out / index["model.layers.1.mlp.gate.weight"]), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32  # the router stays

    import_serving(out, back, log=lambda *a: None)
    original, imported = all_tensors(DistCheckpoint(trained)), all_tensors(DistCheckpoint(back))
    assert set(original) == set(imported)
    worst = 0.0
    for key, w in original.items():
        quantised = key.endswith(("linear_q.weight", "linear_k.weight", "linear_v.weight", "linear_proj.weight",
                                  "linear_fc1.weight", "linear_fc2.weight", "eh_proj.weight"))
        if not quantised:
            assert torch.equal(w, imported[key]), key
            continue
        # Blocks are laid over each serving matrix: one expert, and gate / up separately.
        experts = list(zip(w, imported[key])) if w.dim() == 3 else [(w, imported[key])]
        for a, b in experts:
            halves = zip(a.chunk(2), b.chunk(2)) if key.endswith("linear_fc1.weight") else [(a, b)]
            for x, y in halves:
                err = (x.double() - y.double()).abs()
                assert (err <= bound(x, BLOCK)).all(), key
                worst = max(worst, (err / x.double().abs().max()).max().item())
    print(f"FP8 round trip: max error relative to the largest weight of its matrix = {worst:.3e}")
    assert 0 < worst <= 2.0**-4

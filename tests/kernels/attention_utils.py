"""Shared by the attention kernel tests: where the Triton kernels can run in this process,
random packed inputs, and the relative error the acceptance is written in."""

from __future__ import annotations

import importlib.util
import os
import random
import sys

import pytest
import torch

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def interpreter_active() -> bool:
    """Whether triton kernels run under the interpreter in this process. triton fixes that
    when a function is decorated, its own library included, so TRITON_INTERPRET=1 must be set
    before triton is first imported (transformers and megatron import it), not later."""
    if "triton" in sys.modules:
        from triton.language import standard

        return type(standard.zeros).__name__ == "InterpretedFunction"
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_device(module_level: bool = False) -> str:
    """Device to run the Triton kernels on: 'cuda' where a GPU is present, 'cpu' when this
    process interprets triton; otherwise skip (the whole module with module_level):
    test_triton_interpreted.py runs these tests in a fresh process with TRITON_INTERPRET=1,
    which leaves the other tests of this one alone."""
    reason = "no GPU, and triton is not interpreted in this process: test_triton_interpreted.py runs these"
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed", allow_module_level=module_level)
    if torch.cuda.is_available():
        return "cuda"
    if not interpreter_active():
        pytest.skip(reason, allow_module_level=module_level)
    return "cpu"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, on finite entries of expected."""
    a, e = actual.float(), expected.float()
    finite = torch.isfinite(e)
    assert torch.equal(finite, torch.isfinite(a)), "non-finite entries differ"
    if not finite.any():
        return 0.0
    return ((a - e)[finite].abs().max() / e[finite].abs().max().clamp_min(1e-30)).item()


def sinks_both_signs(heads: int, gen: torch.Generator, device) -> torch.Tensor:
    """Sink logits with at least one clearly positive and one clearly negative head."""
    sinks = 2 * torch.randn(heads, generator=gen)
    sinks[0], sinks[-1] = 2.5, -2.5
    return sinks.to(device)


def packed(lengths: list[int], batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and segment ids [batch, sum(lengths)] for sequences packed back to back."""
    lens = torch.tensor(lengths)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), lens)
    pos = torch.arange(int(lens.sum())) - (lens.cumsum(0) - lens)[seg]
    return pos.expand(batch, -1).to(device), seg.expand(batch, -1).to(device)


def random_lengths(rng: random.Random, count: int, lo: int, hi: int, block: int = 16) -> list[int]:
    """Sequence lengths in [lo, hi], none a multiple of the kernels' test block size."""
    lengths = [rng.randint(lo, hi) for _ in range(count)]
    return [n + 1 if n % block == 0 else n for n in lengths]


def packed_row(lengths, heads=4, kv_heads=2, dk=12, dv=8):
    """One packed row of segments of these lengths: q, k, v (requiring grad), positions that
    restart at each segment, and segment ids."""
    n = sum(lengths)
    pos, seg = packed(lengths, 1, "cpu")
    q = torch.randn(1, n, heads, dk, requires_grad=True)
    k = torch.randn(1, n, kv_heads, dk, requires_grad=True)
    v = torch.randn(1, n, kv_heads, dv, requires_grad=True)
    return q, k, v, pos, seg

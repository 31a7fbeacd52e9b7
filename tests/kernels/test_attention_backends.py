"""The dispatcher's choices that need no kernel: the reference on CPU by default, the backend
argument and MIMO_ATTENTION_BACKEND, a clear error where the kernels cannot run, and the
reference's answer for a query that sees nothing."""

import pytest
import torch

from mimo_train.kernels.attention import attention, attention_reference
from tests.kernels.attention_utils import interpreter_active, packed


def inputs():
    gen = torch.Generator().manual_seed(3)
    pos, seg = packed([13, 7], 1, "cpu")
    q, k, v = (torch.randn(1, 20, h, d, generator=gen) for h, d in ((4, 24), (2, 24), (2, 16)))
    sinks = torch.tensor([1.0, -1.0, 2.0, -2.0])
    return (q, k, v), dict(scale=0.2, q_pos=pos, k_pos=pos, sinks=sinks, window=5, q_seg=seg, k_seg=seg)


def test_cpu_default_is_the_reference(monkeypatch):
    monkeypatch.delenv("MIMO_ATTENTION_BACKEND", raising=False)
    args, kwargs = inputs()
    out, lse = attention(*args, **kwargs)
    ref_out, ref_lse = attention_reference(*args, **kwargs)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    monkeypatch.setenv("MIMO_ATTENTION_BACKEND", "reference")
    assert torch.equal(attention(*args, **kwargs)[0], ref_out)


def test_unknown_backend_is_refused(monkeypatch):
    args, kwargs = inputs()
    with pytest.raises(ValueError, match="backend"):
        attention(*args, backend="flash", **kwargs)
    monkeypatch.setenv("MIMO_ATTENTION_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend"):
        attention(*args, **kwargs)


def test_reference_rows_without_keys_are_zero():
    """A padding query (position -1) without sinks: out 0 and lse -inf, not NaN."""
    args, kwargs = inputs()
    kwargs.update(sinks=None, q_pos=kwargs["q_pos"].clone())
    kwargs["q_pos"][0, -3:] = -1
    out, lse = attention_reference(*args, **kwargs)
    assert torch.equal(out[0, -3:], torch.zeros_like(out[0, -3:])) and torch.isneginf(lse[..., -3:]).all()
    assert torch.isfinite(out).all()


def test_cpu_kernels_without_the_interpreter_say_why():
    pytest.importorskip("triton")
    if torch.cuda.is_available() or interpreter_active():
        pytest.skip("the kernels can run here")
    args, kwargs = inputs()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        attention(*args, backend="triton", **kwargs)

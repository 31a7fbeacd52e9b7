"""Attention and sampling kernels, imported as `mimo_train.kernels`.

Callers use the dispatchers (`attention`), never a kernel directly: the dispatch point is
the one place that chooses an implementation for the device.
"""

from mimo_train.kernels.attention import attention, attention_reference

__all__ = ["attention", "attention_reference"]

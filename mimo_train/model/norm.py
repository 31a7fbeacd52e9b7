"""RMSNorm for megatron-core's local (non-Transformer-Engine) specs, usable with sequence parallel.

megatron's `WrappedTorchNorm` refuses `sequence_parallel` because the torch norm cannot
all-reduce its own gradient. It does not need to: under sequence parallelism each tensor-parallel
rank normalises a different slice of the tokens, and megatron's `finalize_model_grads`
all-reduces over TP the grads of every parameter tagged `sequence_parallel` — the tag is all
that is missing. The math is torch's RMSNorm, as in `WrappedTorchNorm`.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm


class RMSNorm:
    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def replace_norms(spec):
    """A copy of a spec tree (ModuleSpec / submodule dataclasses / lists) with every
    `WrappedTorchNorm` replaced by `RMSNorm`."""
    if spec is WrappedTorchNorm:
        return RMSNorm
    if isinstance(spec, list):
        return [replace_norms(s) for s in spec]
    if isinstance(spec, ModuleSpec):
        module = RMSNorm if spec.module is WrappedTorchNorm else spec.module
        return dataclasses.replace(spec, module=module, submodules=replace_norms(spec.submodules))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: replace_norms(getattr(spec, f.name))
                                            for f in dataclasses.fields(spec) if f.init})
    return spec

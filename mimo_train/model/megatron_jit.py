"""megatron-core's `torch.compile`d helpers run eagerly on a machine without CUDA.

megatron-core 0.16 decorates a dozen small elementwise helpers with `jit_fuser`, which is
`torch.compile` on any torch >= 2.2 (megatron/core/jit.py). Our model switches megatron's
fusions off, but one of those helpers runs in every MoE training step regardless: the router's
expert-bias bookkeeping (`TopKRouter._apply_expert_bias`). Without CUDA, compiling it means
TorchDynamo plus Inductor's C++ code generation in every process, measured here at 2.6 s of a
13 s two-step MOPD run of the tiny model (`python -m cProfile mimo_train/run.py recipe=mopd ...`),
plus about 1 s to import Dynamo and Inductor for the decorations. On a CPU those kernels gain
nothing measurable: a few elementwise operations over the experts.

megatron provides `disable_jit_fuser()`, but it must run after megatron/core/jit.py executes and
before any module that decorates with `jit_fuser` binds it, and importing megatron.core.jit
imports all of megatron.core first. So `install()` (called by `mimo_train/__init__.py`, before
anything imports megatron) adds an import hook that calls it the moment megatron/core/jit.py
has executed, only when CUDA is absent. With CUDA, nothing changes. Numerics do not change
either: the compiled and the eager helper compute the same elementwise expressions
(tests/model/test_compat.py checks that the helpers are eager on CPU).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

MODULE = "megatron.core.jit"


class _EagerFusers(importlib.abc.MetaPathFinder):
    """Finds megatron.core.jit as the path finder would, and runs `disable_jit_fuser()` right
    after the module executes (when CUDA is absent)."""

    def find_spec(self, name, path=None, target=None):
        if name != MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            import torch

            if not torch.cuda.is_available():
                module.disable_jit_fuser()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Idempotent. Too late (a no-op) once megatron.core.jit has been imported."""
    if MODULE not in sys.modules and not any(isinstance(f, _EagerFusers) for f in sys.meta_path):
        sys.meta_path.insert(0, _EagerFusers())


def eager() -> bool:
    """Whether megatron's jit_fuser helpers are plain functions in this process."""
    from megatron.core import jit

    return jit.jit_fuser is jit.noop_decorator

"""Runs the Triton kernel tests under the interpreter on a machine without a GPU.

They need TRITON_INTERPRET=1 before triton is first imported, and in a full pytest run
transformers and megatron import triton at collection; setting the variable for this whole
process would also change how every other test sees triton. So the kernel tests run here, in
one fresh process. In that process (or when a run starts with TRITON_INTERPRET=1, or on a GPU)
they run directly and this runner skips."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.kernels.attention_utils import interpreter_active

ROOT = Path(__file__).parents[2]
KERNEL_TESTS = ["test_triton_attention.py", "test_triton_decode.py", "test_attention_dispatch.py",
                "test_model_on_kernels.py", "test_triton_sampling.py",
                "test_bench_kernels.py::test_smoke_run_checks_the_kernels"]


def test_kernel_tests_under_the_interpreter():
    pytest.importorskip("triton")
    if torch.cuda.is_available() or interpreter_active():
        pytest.skip("the kernel tests run directly in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           *(f"tests/kernels/{f}" for f in KERNEL_TESTS)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    summary = proc.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary, report  # every kernel test really ran

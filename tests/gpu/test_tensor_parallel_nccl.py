"""GPU lane: tensor parallelism over NCCL (two GPUs) gives one GPU's logits, for the main model
and every MTP depth. Needs two GPUs: with fewer it skips (runs then use gloo, as the CPU lane's
test_tensor_parallel.py checks)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.model import tp_worker

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def test_tp2_on_nccl_equals_one_gpu(tmp_path, megatron_single):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"TP=2 on NCCL needs two GPUs; {torch.cuda.device_count()} visible")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29527", "tests/model/tp_worker.py",
                           str(tmp_path / "tp2.pt"), "2"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, MIMO_TEST_LANE="gpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    parallel = torch.load(tmp_path / "tp2.pt", weights_only=True)["logits"]
    single = tp_worker.logits(tp=1)
    for depth, (a, b) in enumerate(zip(parallel, single)):
        # NCCL's all-reduce sums in another order than one GPU's matmul: fp32 rounding only.
        assert (a.float().cpu() - b.float().cpu()).abs().max().item() <= 1e-4, f"depth {depth}"

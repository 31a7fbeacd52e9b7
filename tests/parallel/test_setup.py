"""Process groups: the backend and device follow the GPUs there are, and the collective timeout
(parallel.timeout_minutes) reaches every group. Each case runs in a fresh process: a process
group is made once per process."""

import subprocess
import sys

import pytest

from mimo_train.training.config import ConfigError, load_config

PRELUDE = "import warnings; warnings.filterwarnings('ignore'); import os, torch, torch.distributed as dist\n"


def run_python(code: str, **env) -> str:
    import os

    out = subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_timeout_reaches_the_default_and_the_megatron_groups():
    out = run_python(
        "from megatron.core import parallel_state as ps\n"
        "from mimo_train.parallel import setup\n"
        "setup.join(7); setup.init_distributed(tp=1)\n"
        "cpu = torch.device('cpu')\n"
        "for g in (None, ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()):\n"
        "    g = g or dist.distributed_c10d._get_default_group()\n"
        "    print(g._get_backend(cpu).options._timeout.total_seconds())\n")
    assert out.split() == ["420.0"] * 3


def test_timeout_is_a_run_setting():
    assert load_config(["recipe=pretrain"]).parallel.timeout_minutes == 60
    assert load_config(["recipe=pretrain", "parallel.timeout_minutes=5"]).parallel.timeout_minutes == 5
    with pytest.raises(ConfigError, match="parallel.timeout_minutes must be >= 1"):
        load_config(["recipe=pretrain", "parallel.timeout_minutes=0"])


# A machine with one GPU, seen by this process as torch would see it.
ONE_GPU = "torch.cuda.is_available = lambda: True; torch.cuda.device_count = lambda: 1\n"


def test_nccl_only_with_a_gpu_per_local_rank():
    out = run_python(ONE_GPU + "from mimo_train.parallel import setup\n"
                     "for n in ('1', '2'):\n"
                     "    os.environ['LOCAL_WORLD_SIZE'] = n; print(setup.backend())\n")
    assert out.split() == ["nccl", "gloo"]


def test_fewer_gpus_than_ranks_runs_on_the_cpu():
    """gloo, and every tensor on the CPU: the process answers as a CUDA-less one, so the
    trainer's device, the fp32 default and megatron's CPU layer all agree with the backend."""
    out = run_python(
        ONE_GPU + "from mimo_train.parallel import setup; from mimo_train.model import compat\n"
        "setup.join(); setup.init_distributed()\n"
        "print(dist.get_backend(), setup.device(), torch.cuda.is_available(), compat._APPLIED)\n",
        LOCAL_WORLD_SIZE="2")
    assert out.split() == ["gloo", "cpu", "False", "True"]

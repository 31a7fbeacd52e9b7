"""What every benchmark's JSON records about where it ran, so that two figures can be compared
(and a figure in the docs traced): device, dtype, threads, library versions, commit."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """HEAD, with "+dirty" when the working tree differs from it (a figure from uncommitted code).
    A copy that is not a checkout of its own (an exported tree inside another repository, as sent
    to a lent GPU) says so, unless MIMO_COMMIT names the commit it was exported from."""
    if os.environ.get("MIMO_COMMIT"):
        return os.environ["MIMO_COMMIT"]
    try:
        top = subprocess.check_output(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        if Path(top).resolve() != ROOT:
            return "unknown (not a git checkout; set MIMO_COMMIT)"
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "mimo_train", "rollout", "kernels", "tools"],
                               cwd=ROOT, stderr=subprocess.DEVNULL).returncode != 0
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str | torch.device, dtype: str | torch.dtype) -> dict:
    device = torch.device(device)
    env = {"device": device.type, "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "python": platform.python_version(), "commit": commit(),
           "versions": {d: _version(d) for d in ("torch", "transformers", "megatron-core", "triton")}}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def sync(device: str | torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock interval covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def torch_threads(n: int):
    """Torch on `n` threads inside, the previous count after. A small model decoding or training
    is a stream of small ops, which OpenMP's hand-offs between threads slow down on a 2-core
    machine: the demo's draft timing and the tests run them on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

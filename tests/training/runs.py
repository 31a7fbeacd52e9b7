"""Run `mimo_train/run.py` as users do (python or torchrun) and read back its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "mimo_train" / "run.py"


def tiny_args(data: Path, run_dir: Path, *extra: str, init: Path | None = None) -> list[str]:
    """The tiny MoE + 3-MTP model (2 kv heads so TP=2 divides them), 6 steps of 8 samples,
    starting from the weights saved in `init` when given."""
    start = [f"checkpoint.load={init}"] if init else []
    return [*start, "recipe=pretrain", "model=tiny", "model.num_key_value_heads=2", "train.steps=6", "train.global_batch=8",
            "train.micro_batch=2", "optim.warmup_steps=1", "data.seq_len=64", f"data.path={data}/train.jsonl",
            f"data.tokenizer={data}/tokenizer", f"logging.run_dir={run_dir}", "logging.progress=false",
            "logging.plot=false", *extra]


def tool(name: str):
    """tools/<name>.py as a module (the tools are scripts, not modules of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_data(out: Path, **kwargs) -> Path:
    """tools/make_data.py's `make` into `out`."""
    tool("make_data").make(out, **kwargs)
    return out


def launch(args: list[str], nproc: int = 1, script: Path = RUN, wait: bool = True):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if nproc == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(script), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def kill_once_logged(proc, run_dir: Path, step: int, timeout_s: float = 300) -> None:
    """SIGKILL `proc` as soon as its metrics.jsonl has `step` (its checkpoint may or may not exist)."""
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and f'"step": {step},' in (run_dir / "metrics.jsonl").read_text():
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()


def train(args: list[str], nproc: int = 1) -> str:
    code, out = launch(args, nproc)
    if code != 0:
        lines = [l for l in out.splitlines() if "warn" not in l.lower() and "return func" not in l]
        raise AssertionError("\n".join(lines[-120:]))
    return out


def train_here(args: list[str]) -> None:
    """`mimo_train/run.py`'s main in this process (the test needs the `megatron_single` fixture),
    one thread as in `launch`'s processes: for reference runs whose output is not read. It saves
    a process start (imports alone are ~6 s of a 2-core machine's time)."""
    from mimo_train.run import main
    from tools.bench_env import torch_threads

    with torch_threads(1):
        assert main(args) == 0, f"run.py {' '.join(args)} failed in this process (see the error above)"


def metrics(run_dir: Path) -> dict[int, dict]:
    """Step -> metrics row; after a resume the row written last for a step wins."""
    rows = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows


LOSSES = ["loss/total", "loss/main", "loss/mtp_1", "loss/mtp_2", "loss/mtp_3"]

"""Run `mimo_train/run.py` as users do (python or torchrun) and read back its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from tests.training import zygote

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


def run_env() -> dict[str, str]:
    """The environment of a test's runs (and of the zygote they fork from): W&B off, one OpenMP
    thread (two pytest workers already keep both cores busy), the repository importable."""
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launch(args: list[str], nproc: int = 1, script: Path = RUN, wait: bool = True, interpreter: bool = False):
    """Run `script` (run.py) with `args` on `nproc` ranks; with `wait`, its (exit status, output).

    A run waited for is forked from this worker's zygote (tests/training/zygote.py: torch and
    megatron-core already imported, torchrun's variables for more ranks); `interpreter=True`, or
    `wait=False` (the test signals the process), starts `python` or `torchrun` itself, for the
    tests of what the launcher does."""
    env = run_env()
    if wait and not interpreter:
        return ZYGOTE.run(script, args, env, nproc, timeout_s=600)
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


class Zygote:
    """tests/training/zygote.py for this pytest worker: started on first use, ended with it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc = None

    def path(self) -> str:
        """The zygote's socket, starting the zygote if it is not running."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            return self.socket

    def _start(self) -> None:
        import atexit
        import tempfile

        if self.proc is None:
            atexit.register(self.close)
        else:  # it died: what it said goes with the error of the run that saw it die
            self.close()
        env = run_env()
        self.dir = tempfile.mkdtemp(prefix="mimo-zygote-")
        self.socket = os.path.join(self.dir, "socket")
        self.stderr = tempfile.TemporaryFile()
        # stdin is its lifeline: it serves until this process's end of the pipe closes.
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "training" / "zygote.py"), self.socket],
                                     cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        if not self.proc.stdout.readline():
            raise RuntimeError(self.died())

    def died(self) -> str:
        self.proc.wait()
        self.stderr.seek(0)
        return (f"the zygote (tests/training/zygote.py) exited with {self.proc.returncode}:\n"
                + self.stderr.read().decode(errors="replace")[-4000:])

    def run(self, script: Path, args: list[str], env: dict, nproc: int, timeout_s: float) -> tuple[int, str]:
        """(exit status, output) of `script args` on `nproc` ranks; stdout and stderr together, as `launch`'s."""
        import tempfile

        path = self.path()
        with tempfile.TemporaryFile() as log, open(os.devnull) as stdin:
            try:
                code = zygote.run(path, str(script), args, env=env, cwd=str(ROOT), nproc=nproc,
                                  fds=(stdin.fileno(), log.fileno(), log.fileno()), timeout_s=timeout_s)
            except TimeoutError as err:
                raise subprocess.TimeoutExpired([str(script), *args], timeout_s) from err
            except (RuntimeError, ConnectionError) as err:  # the connection dropped: did the zygote die?
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    raise err from None
                raise RuntimeError(self.died()) from err
            log.seek(0)
            return code, log.read().decode(errors="replace")

    def close(self) -> None:
        import shutil

        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


ZYGOTE = Zygote()


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

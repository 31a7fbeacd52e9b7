"""SIGTERM to one rank of a data-parallel run stops every rank at the same step, with a
checkpoint, instead of leaving the others waiting in a collective."""

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.training.runs import launch, metrics, tiny_args


def _children(pid: int) -> list[int]:
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:  # the process ended meanwhile
            continue
        if int(fields.get("PPid", "0").strip()) == pid:
            out.append(int(status.parent.name))
    return out


def _worker(agent_pid: int, local_rank: int) -> int:
    """The pid of torchrun's worker process with this LOCAL_RANK."""
    children = _children(agent_pid)
    for pid in children:
        if f"LOCAL_RANK={local_rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return pid
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank} among {children}")


def test_sigterm_to_one_rank_stops_all_ranks_with_a_checkpoint(synthetic_data, initial_weights, tmp_path):
    args = tiny_args(synthetic_data, tmp_path, "train.steps=500", init=initial_weights)
    proc = launch(args, nproc=2, wait=False)
    deadline = time.time() + 300
    log = tmp_path / "metrics.jsonl"
    while time.time() < deadline and not (log.exists() and '"step": 2' in log.read_text()):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    os.kill(_worker(proc.pid, 1), signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGKILL)  # the workers stuck in a collective
        proc.kill()
        raise AssertionError("the run did not stop after SIGTERM to rank 1 (ranks disagree on the last step)")
    assert proc.returncode == 0, out[-3000:]
    last = max(metrics(tmp_path))
    assert 2 <= last < 500
    saved = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert saved.endswith(f"{last:07d}"), (saved, last)

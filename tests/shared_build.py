"""Session fixtures built once per `pytest` run, not once per xdist worker.

`make test` runs test files on two pytest-xdist workers, and a session fixture is per worker:
a fixture used by files on both workers (the convert tests' 4-rank checkpoint, the training and
RL reference runs) would be built twice, each build a minute of the 2 cores' time. `build_once`
builds it in a directory both workers see, under a file lock: the first worker to ask builds,
the other waits and reuses it. What it returns must be used read-only (tests copy before they
change anything). A build that fails leaves no completion mark, so the next asker builds again
(and fails the same way, in its own test).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import Callable


def shared_root(tmp_path_factory) -> Path:
    """pytest's base temp directory of this run: under xdist, the parent of every worker's own."""
    base = Path(tmp_path_factory.getbasetemp())
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """The directory `name`, filled by `build(directory)` exactly once per pytest run."""
    root = shared_root(tmp_path_factory) / "shared"
    root.mkdir(exist_ok=True)
    out, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if build raises
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            done.touch()
    return out

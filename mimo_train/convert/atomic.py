"""Output directories that appear complete or not at all.

Everything is written into `<out>.tmp` and renamed to `<out>` at the end (one rename on the
same filesystem), so a crash, a full disk or a failed check leaves at most a `.tmp` directory,
which no loader mistakes for a checkpoint and the next run removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from mimo_train.convert.names import ConvertError


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse to clobber an existing output unless asked; called before any work starts."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConvertError(f"output {out} already exists and is not empty; pass --overwrite to replace it")
    if not out.parent.exists():
        raise ConvertError(f"the parent directory of the output, {out.parent}, does not exist")
    return out


def temp_dir(out: Path) -> Path:
    return out.with_name(out.name + ".tmp")


def start(out: Path) -> Path:
    """A fresh `<out>.tmp`; a leftover one is an interrupted earlier run, and is removed."""
    tmp = temp_dir(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def commit(tmp: Path, out: Path) -> Path:
    """Move the finished `<out>.tmp` to `<out>`; an existing output is replaced only now,
    so it stays intact if anything before this point failed."""
    old = out.with_name(out.name + ".old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(out, old)
    os.rename(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return out


@contextlib.contextmanager
def output(out: Path):
    """`start(out)` for the block, `commit` when it completes; if anything in it fails, the
    `.tmp` is removed and the error goes on: the output is complete or absent."""
    tmp = start(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit(tmp, out)

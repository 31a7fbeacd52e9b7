"""The zygote (tests/training/zygote.py) that starts the suite's runs gives each a process that
behaves as `python SCRIPT ARGS` (or torchrun's ranks) would: its arguments, environment, working
directory and output, an interpreter's shutdown, its exit status; a failing rank stops the
others; a caller that gives up takes its run with it."""

import json
import os
import sys
import time

import pytest

from tests.training import zygote
from tests.training.runs import ROOT, ZYGOTE, launch

SCRIPT = '''
import atexit, json, os, sys, time
atexit.register(lambda: print("atexit ran", flush=True))
print(json.dumps({"argv": sys.argv, "file": __file__, "path0": sys.path[0], "cwd": os.getcwd(),
                  "marker": os.environ.get("ZYGOTE_MARKER"), "rank": os.environ.get("RANK"),
                  "world": os.environ.get("WORLD_SIZE"), "name": __name__, "pid": os.getpid()}))
print("to stderr", file=sys.stderr)
mode = sys.argv[1]
if mode == "fail-rank1" and os.environ.get("RANK") == "1":
    sys.exit(3)
if mode in ("fail-rank1", "sleep"):
    time.sleep(60)
if mode == "raise":
    raise RuntimeError("boom")
sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
'''


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(SCRIPT)
    return path


def rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_a_child_is_the_script_run_as_main_with_its_arguments_environment_and_exit_status(script, monkeypatch):
    monkeypatch.setenv("ZYGOTE_MARKER", "seen")
    code, out = launch(["ok", "5"], script=script)
    assert code == 5, out
    (row,) = rows(out)
    assert row["argv"] == [str(script), "ok", "5"] and row["file"] == str(script) and row["name"] == "__main__"
    assert row["path0"] == str(script.parent) and row["cwd"] == str(ROOT) and row["marker"] == "seen"
    assert row["rank"] is None and row["pid"] != os.getpid()
    assert "to stderr" in out and "atexit ran" in out  # both streams, and the interpreter's shutdown


def test_an_uncaught_exception_is_a_traceback_and_status_1(script):
    code, out = launch(["raise"], script=script)
    assert code == 1 and "RuntimeError: boom" in out and "Traceback" in out


def test_ranks_get_torchruns_variables_and_one_failing_rank_stops_the_others(script):
    start = time.time()
    code, out = launch(["fail-rank1"], nproc=2, script=script)
    assert code == 3, out
    assert time.time() - start < zygote.GRACE_S  # rank 0 was sleeping 60 s: it was stopped (SIGTERM)
    assert sorted((r["rank"], r["world"]) for r in rows(out)) == [("0", "2"), ("1", "2")]


def test_a_caller_that_gives_up_takes_its_run_with_it(script, tmp_path):
    with pytest.raises(TimeoutError):
        zygote.run(ZYGOTE.path(), str(script), ["sleep"], env=dict(os.environ), cwd=str(tmp_path),
                   fds=(0, sys.stdout.fileno(), sys.stderr.fileno()), timeout_s=1)
    deadline = time.time() + 10
    while time.time() < deadline and zygote_children():
        time.sleep(0.1)
    assert not zygote_children()


def zygote_children() -> list[str]:
    """Live processes whose parent is this worker's zygote."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            state, parent = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state != "Z" and parent == str(ZYGOTE.proc.pid):
            found.append(pid)
    return found

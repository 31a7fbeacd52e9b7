"""The watchdog that runs vLLM: when whoever started it dies (even by SIGKILL) or stops it, the
server's whole process group goes, children included; when the server exits, its code comes
back."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mimo_train.rollout.vllm.server import WATCHDOG
from tests.rollout.vllm_utils import group_members

# A "server" that starts a child and sleeps, as vLLM's API server starts its engine and workers.
SERVER = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
          "print('up', flush=True); time.sleep(300)")


def start_via_parent(log: Path) -> tuple[subprocess.Popen, int]:
    """A parent process that starts the watchdog and then waits forever; returns it and the
    server's process group."""
    parent = subprocess.Popen([sys.executable, "-c", (
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, {str(WATCHDOG)!r}, {str(log)!r}, '--', "
        f"sys.executable, '-c', {SERVER!r}]); time.sleep(300)")])
    deadline = time.time() + 30
    while not (log.exists() and "up" in log.read_text()):
        assert time.time() < deadline
        time.sleep(0.05)
    server = int(subprocess.check_output(["pgrep", "-f", "-n", "print\\('up'"]).split()[0])
    return parent, os.getpgid(server)


def wait_gone(group: int, timeout_s: float = 20) -> None:
    deadline = time.time() + timeout_s
    while group_members({group}) and time.time() < deadline:
        time.sleep(0.1)
    assert not group_members({group})


def test_sigkill_of_the_parent_stops_the_servers_whole_group(tmp_path):
    parent, group = start_via_parent(tmp_path / "log")
    assert len(group_members({group})) == 2  # the server and its child
    parent.kill()
    parent.wait()
    wait_gone(group)


def test_the_servers_exit_code_comes_back_and_its_children_go(tmp_path):
    log = tmp_path / "log"
    script = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
              "print('child started', flush=True); sys.exit(3)")
    code = subprocess.run([sys.executable, str(WATCHDOG), str(log), "--", sys.executable, "-c", script], timeout=60).returncode
    assert code == 3 and "child started" in log.read_text()
    assert subprocess.run(["pgrep", "-f", "time.sleep\\(300\\)"], capture_output=True).stdout.strip() == b"" or \
        all("sleep(300)" not in m for m in group_members({os.getpgrp()}))


def test_sigterm_stops_the_group(tmp_path):
    log = tmp_path / "log"
    dog = subprocess.Popen([sys.executable, str(WATCHDOG), str(log), "--", sys.executable, "-c", SERVER])
    deadline = time.time() + 30
    while not (log.exists() and "up" in log.read_text()):
        assert time.time() < deadline
        time.sleep(0.05)
    server = int(subprocess.check_output(["pgrep", "-f", "-n", "print\\('up'"]).split()[0])
    group = os.getpgid(server)
    dog.send_signal(signal.SIGTERM)
    assert dog.wait(30) == 0
    wait_gone(group)

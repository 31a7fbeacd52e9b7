"""Run a server so that it dies with the process that started it (standard library only).

    python watchdog.py LOG_FILE -- COMMAND...

vLLM is several processes (API server, engine core, workers). When the API server is killed
with SIGKILL its children live on, and nothing stops any of them when the trainer that started
them is killed with SIGKILL. This watchdog asks the kernel for SIGTERM when its parent dies
(prctl PR_SET_PDEATHSIG), starts COMMAND in a process group of its own with stdout and stderr
to LOG_FILE, and on SIGTERM, SIGINT or the parent's death stops the whole group (SIGTERM,
then SIGKILL after a grace period). When the server exits by itself the rest of its group is
stopped too and the watchdog exits with the server's code.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

GRACE_S = 10.0
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` to this process when its parent exits (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except OSError:
        pass


def stop_group(pgid: int, grace_s: float = GRACE_S) -> None:
    """SIGTERM to what is left of the group, SIGKILL to what is left after `grace_s`."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: watchdog.py LOG_FILE -- COMMAND...", file=sys.stderr)
        return 2
    log_path, command = argv[0], argv[2:]
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        return 1
    with open(log_path, "ab", buffering=0) as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True, preexec_fn=die_with_parent)
    stopping: list[float] = []  # when a stop was asked for

    # The handler only asks; the loop below waits, and reaps the server as it goes: a handler
    # that waited for the group would wait on the server's own zombie (measured: 10 s per stop).
    def on_signal(signum, frame):  # noqa: ARG001
        if not stopping:
            stopping.append(time.monotonic())
            try:
                os.killpg(server.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    while server.poll() is None:
        if stopping and time.monotonic() > stopping[0] + GRACE_S:
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    left = max(0.5, stopping[0] + GRACE_S - time.monotonic()) if stopping else 2.0
    stop_group(server.pid, grace_s=left)  # the server's children, if it left any
    return 0 if stopping else server.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

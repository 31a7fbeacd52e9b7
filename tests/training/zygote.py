"""A process that has imported torch, megatron-core and mimo_train once, and forks a fresh child
for each run a test asks for (tests/training/runs.py starts one per pytest worker; the docs
test's `python` and `torchrun` reach it through tests/docs/doc_shell.py).

Why: a run's process spends ~4.5 s of CPU importing torch and megatron-core before its first
step, and the suite starts dozens of runs (and their ranks) on a 2-core machine; a forked child
starts with those modules loaded (the suite went from 21 min 47 s to 14 min 25 s,
docs/experiments.md#test-time). Nothing runs here but imports (checked: one thread), so a
child is, as far as a run can tell, a fresh interpreter: it gets the caller's stdin, stdout and
stderr, environment and working directory, fresh Python and NumPy random seeds, `sys.argv`,
`sys.path[0]` and `__file__` as `python SCRIPT ARGS` sets them, runs the script as `__main__`,
and leaves through the interpreter's own shutdown (threads joined, atexit handlers run, buffers
flushed) with the script's exit status.

What a child cannot get fresh is what the interpreter fixes at its start: the string-hash seed
(all children share the zygote's, where torchrun's ranks each draw one, so a set of strings
iterated in a different order on two ranks shows only under torchrun), `-X`/`-W` options, and
OpenMP's thread pool size (set again through torch.set_num_threads from OMP_NUM_THREADS).

A multi-rank request forks one child per rank with the variables torchrun gives its workers
(rank, world size, a free rendezvous port on 127.0.0.1) and, as torchrun does, stops the other
ranks once one fails. The tests of torchrun's own behaviour (stop signals, one error line per
rank) still start torchrun.

    python tests/training/zygote.py SOCKET    # serves until its stdin closes (its parent's end)

Protocol (`run` below is the client): one SOCK_SEQPACKET connection per run; the request is
{"script", "args", "env", "cwd", "nproc"} with the child's stdin, stdout and stderr passed as
file descriptors; the answers are {"pids": [...]} once the ranks exist and {"exit": CODE} when
they have all ended (the first failing rank's status, -N for signal N, else 0). A client that
goes away takes its run with it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import time

GRACE_S = 30.0  # between SIGTERM and SIGKILL for the ranks still running after one failed


def run(path: str, script: str, args: list[str], *, env: dict, cwd: str, nproc: int = 1,
        fds: tuple[int, int, int] = (0, 1, 2), timeout_s: float | None = None) -> int:
    """Run `script` with `args` on `nproc` ranks from the zygote at `path`; its exit status."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.connect(path)
        request = {"script": script, "args": [str(a) for a in args], "env": env, "cwd": cwd, "nproc": nproc}
        socket.send_fds(conn, [json.dumps(request).encode()], list(fds))
        conn.settimeout(timeout_s)
        for _ in range(2):  # {"pids"}, then {"exit"}; closing the connection on a timeout stops the run
            message = conn.recv(1 << 16)
            if not message:
                raise RuntimeError("the zygote (tests/training/zygote.py) went away during a run")
            answer = json.loads(message)
            if "exit" in answer:
                return answer["exit"]
    raise AssertionError("unreachable")


# ---- the zygote itself ---------------------------------------------------------------------


def preload() -> None:
    import threading
    import warnings

    warnings.filterwarnings("ignore", module="megatron")
    import mimo_train.rl.loop  # noqa: F401  (the RL recipes; the training loop comes with them)
    import mimo_train.run  # noqa: F401
    import mimo_train.training.config  # noqa: F401
    import mimo_train.training.loop  # noqa: F401

    warnings.resetwarnings()
    # Forking copies only the calling thread: a thread started by an import would be missing in
    # every child, so refuse to serve rather than hand out broken processes.
    assert threading.active_count() == 1, f"an import started threads: {threading.enumerate()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    """What torchrun --standalone sets for a worker on one node (the ones our code and DeepSpeed read)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
            "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "ROLE_WORLD_SIZE": str(nproc),
            "GROUP_WORLD_SIZE": "1", "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "TORCHELASTIC_RUN_ID": "zygote", "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0"}


def become_run(request: dict, fds: list[int], extra_env: dict[str, str], inherited: list[socket.socket]) -> None:
    """In the child: turn into `python SCRIPT ARGS`, run it, and leave by SystemExit, which
    unwinds to the interpreter's shutdown (never back into the serving loop)."""
    import random
    import runpy

    import numpy as np
    import torch

    # The zygote's sockets: a child holding them would keep other runs' clients waiting. Closed
    # through their objects, whose finalizers would otherwise close the numbers again later,
    # by then another file's (gloo's, once).
    for sock in inherited:
        sock.close()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds):
        if fd > 2:
            os.close(fd)
    os.environ.clear()
    os.environ.update({**request["env"], **extra_env})
    os.chdir(request["cwd"])
    random.seed()
    np.random.seed()
    # OMP_NUM_THREADS is read when torch loads, which was in the zygote: apply it as a new process would.
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    script = os.path.abspath(request["script"])
    sys.argv = [request["script"], *request["args"]]
    sys.path[0] = os.path.dirname(os.path.realpath(script))
    runpy.run_path(script, run_name="__main__")
    raise SystemExit(0)


class Job:
    """One request's ranks (`serve` keeps its connection, and answers there when the last has ended)."""

    def __init__(self, pids: list[int]):
        self.running, self.code, self.kill_at, self.client_gone = set(pids), 0, None, False

    def ended(self, pid: int, status: int) -> None:
        self.running.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and self.code == 0:
            self.code = code
            self.stop()

    def stop(self) -> None:
        """SIGTERM the ranks still running; SIGKILL them GRACE_S later (torchrun's way)."""
        if self.kill_at is None:
            self.kill_at = time.time() + GRACE_S
            self.signal(signal.SIGTERM)

    def signal(self, sig: int) -> None:
        for pid in self.running:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def start(conn: socket.socket, inherited: list[socket.socket]) -> Job | None:
    """Read one request from `conn` and fork its ranks."""
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    if not message or len(fds) != 3:
        conn.close()
        return None
    request = json.loads(message)
    nproc = request["nproc"]
    port = free_port() if nproc > 1 else 0
    sys.stdout.flush()
    sys.stderr.flush()
    pids = []
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            become_run(request, fds, rank_env(rank, nproc, port) if nproc > 1 else {}, inherited)
        pids.append(pid)
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pids": pids}).encode())
    return Job(pids)


def serve(listener: socket.socket) -> None:
    jobs: dict[int, Job] = {}  # pid -> its job
    conns: dict[socket.socket, Job] = {}
    while True:
        waiting = [listener, *(conn for conn, job in conns.items() if not job.client_gone)]
        readable = select.select([0, *waiting], [], [], 0.05)[0]
        if 0 in readable and not os.read(0, 1 << 10):  # our parent has gone: so do its runs
            for job in conns.values():
                job.signal(signal.SIGKILL)
            return
        for conn in readable:
            if conn is listener:
                client, _ = listener.accept()
                job = start(client, [listener, *conns, client])
                if job:
                    conns[client] = job
                    jobs.update({pid: job for pid in job.running})
            elif conn != 0 and not conn.recv(1 << 10):  # the client went away: stop its run
                conns[conn].client_gone = True
                conns[conn].stop()
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            job = jobs.pop(pid, None)
            if job:
                job.ended(pid, status)
        now = time.time()
        for conn, job in list(conns.items()):
            if job.kill_at is not None and now >= job.kill_at:
                job.signal(signal.SIGKILL)
            if not job.running:
                try:
                    conn.sendall(json.dumps({"exit": job.code}).encode())
                except OSError:
                    pass  # the client has gone
                conn.close()
                del conns[conn]


def main(path: str) -> None:
    preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(16)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    serve(listener)


if __name__ == "__main__":
    main(sys.argv[1])

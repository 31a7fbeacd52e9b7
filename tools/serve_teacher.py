"""Serve one frozen MOPD teacher over HTTP on this machine (see mimo_train/rl/teacher_server.py).

    python tools/serve_teacher.py --ckpt runs/teacher-math/checkpoints --name math --port 8101
    python tools/serve_teacher.py --ckpt export/teacher-code --port 0     # any free port

The first stdout line is JSON, {"url": "http://127.0.0.1:PORT", ...}, so a parent process that
started the server with --port 0 can read where it listens. Point the teacher's config at it
with `server: http://127.0.0.1:PORT`. A block-FP8 serving dir (`tools/export.py --fp8`) is
dequantised on load and served in the engine's dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_server(argv: list[str] | None = None):
    """Parse the command line, load the teacher and bind the server (not serving yet)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="training checkpoint dir (or one iter_* dir) or serving dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=0, help="0: pick a free port (printed on the first line)")
    p.add_argument("--name", default=None, help="teacher name reported by /info (default: the checkpoint's name)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences scored per forward")
    p.add_argument("--max-len", type=int, default=4096, help="longest prompt + response (capped by the model)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--max-top-numbers", type=int, default=None,
                   help="top-k entries (response tokens x top_k) one request may ask for "
                        "(default: MAX_TOP_NUMBERS in mimo_train/rl/teacher_server.py, 2M; /info states it and "
                        "RemoteTeacher splits its calls under it)")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    a = p.parse_args(argv)

    from mimo_train.rl.teacher_server import MAX_TOP_NUMBERS, TeacherServer
    from mimo_train.rl.teachers import InProcessTeacher, TeacherSpec
    from mimo_train.rollout import EngineConfig

    limit = MAX_TOP_NUMBERS if a.max_top_numbers is None else a.max_top_numbers
    if limit < 1:
        p.error(f"--max-top-numbers must be >= 1, got {limit}")
    name = a.name or Path(a.ckpt).resolve().name
    try:
        teacher = InProcessTeacher(TeacherSpec(name, domain="", checkpoint=a.ckpt),
                                   EngineConfig(max_batch=a.max_batch, max_len=a.max_len, device=a.device))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"serve_teacher: {e}")
    return TeacherServer(teacher, a.host, a.port, verbose=a.verbose, max_top_numbers=limit)


def main(argv: list[str] | None = None) -> None:
    server = make_server(argv)
    # First line, flushed: a parent that passed --port 0 reads the URL from it.
    print(json.dumps({"url": server.url, **server.info}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()

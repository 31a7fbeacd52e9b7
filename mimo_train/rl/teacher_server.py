"""The HTTP side of a teacher process (tools/serve_teacher.py is the command line around it).

    GET  /info      -> {"name", "vocab_size", "tokenizer_fingerprint", "max_len", "max_top_numbers"}
    POST /logprobs  {"prompts": [[ids]], "responses": [[ids]], "temperature": T, "top_k": k}
                    -> {"logprobs": [[floats]]}   (log_softmax(logits / T) of each response token)
                       and with k > 0 also "top_ids": [[[k ids]]], "top_logprobs": [[[k floats]]]
                       (per response, per token: the k most likely next tokens, most likely first)
    GET  /metrics   -> Prometheus text: requests by status, tokens scored, scoring seconds

"temperature" (default 1) and "top_k" (default 0) are optional: a request without top_k gets
the sampled-token answer alone, as before top_k existed. One request may ask for at most
max_top_numbers top-k entries (response tokens x k; each is an id and a log-prob): the JSON of
[tokens x vocab] would be gigabytes. RemoteTeacher splits its calls to stay under the limit
/info states; `tools/serve_teacher.py --max-top-numbers` raises it.

Standard library only (http.server), bound to 127.0.0.1 by default: the trainer and its teachers
share a machine, and nothing here is meant for other hosts. Bad requests get a 400 with the
reason in plain text (the client raises it without retrying); any other failure is a 500
(retried). Successful answers are JSON.
Requests are served by threads, but the engine has one set of cache rows, so one lock
serialises every forward.
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from mimo_train.rl.teachers import check_request

MAX_BODY_BYTES = 256 << 20  # a bound on what one request may make the server read
# Top-k entries one answer may carry. Each is an id and a float32's repr, 27.5 bytes of JSON (for
# 2M random top-32 entries over a 152k vocabulary: 55 MB), so this bounds an answer near 55 MB;
# one sequence's whole distribution (4k tokens x 152k) would be 17 GB.
MAX_TOP_NUMBERS = 2_000_000


class TeacherServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not keep the process alive on shutdown

    def __init__(self, teacher, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False,
                 max_top_numbers: int = MAX_TOP_NUMBERS):
        """teacher: an InProcessTeacher (anything with .info() and .score())."""
        if isinstance(max_top_numbers, bool) or not isinstance(max_top_numbers, int) or max_top_numbers < 1:
            raise ValueError(f"max_top_numbers must be an int >= 1, got {max_top_numbers!r}")
        self.teacher, self.verbose, self.max_top_numbers = teacher, verbose, max_top_numbers
        self.lock = threading.Lock()
        # computed once: the tokenizer fingerprint loads a tokenizer. The limit is stated so that
        # clients can split their calls under it.
        self.info = {**teacher.info(), "max_top_numbers": max_top_numbers}
        # A registry per server (not the process-wide default): tests run several in one process.
        self.registry = CollectorRegistry()
        self.requests = Counter("mimo_teacher_requests", "POST /logprobs requests by HTTP status", ["status"],
                                registry=self.registry)
        self.tokens = Counter("mimo_teacher_scored_tokens", "response tokens scored", registry=self.registry)
        self.seconds = Histogram("mimo_teacher_score_seconds", "time to score one request (lock wait included)",
                                 registry=self.registry)
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def score(self, body) -> dict:
        """The /logprobs answer for a parsed body; ValueError for a bad one (-> 400)."""
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object {prompts, responses, temperature, top_k}")
        unknown = set(body) - {"prompts", "responses", "temperature", "top_k"}
        if unknown or "prompts" not in body or "responses" not in body:
            raise ValueError(f"expected keys prompts, responses (and optional temperature, top_k); got {sorted(body)}")
        prompts, responses, t = body["prompts"], body["responses"], body.get("temperature", 1.0)
        top_k = body.get("top_k", 0)
        # Checked before taking the lock: a bad request must not queue behind good ones.
        check_request(prompts, responses, self.info["vocab_size"], self.info["max_len"], t, top_k)
        n_tokens = sum(len(r) for r in responses)
        if n_tokens * top_k > self.max_top_numbers:
            raise ValueError(f"top_k={top_k} x {n_tokens} response tokens = {n_tokens * top_k} top-k entries exceeds "
                             f"this server's limit of {self.max_top_numbers} per request: send fewer responses per "
                             f"request (RemoteTeacher splits by /info's max_top_numbers) or start the server with a "
                             f"larger --max-top-numbers")
        with self.seconds.time(), self.lock:
            out = self.teacher.score(prompts, responses, t, top_k)
        self.tokens.inc(n_tokens)
        answer = {"logprobs": [s.logprobs.tolist() for s in out]}
        if top_k:  # absent for k = 0: the answer a client that never sends top_k has always had
            answer["top_ids"] = [s.top_ids.tolist() for s in out]
            answer["top_logprobs"] = [s.top_logprobs.tolist() for s in out]
        return answer


class _Handler(BaseHTTPRequestHandler):
    server: TeacherServer
    protocol_version = "HTTP/1.1"  # with Content-Length on every answer, so clients can reuse a connection

    def do_GET(self):  # noqa: N802 -- http.server's naming
        if self.path.rstrip("/") == "/info":
            return self._send(200, self.server.info)
        if self.path.rstrip("/") == "/metrics":
            return self._write(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        self._error(404, f"unknown path {self.path}: GET /info, GET /metrics or POST /logprobs")

    def do_POST(self):  # noqa: N802
        if self.path.rstrip("/") != "/logprobs":
            return self._error(404, f"unknown path {self.path}: POST /logprobs")
        try:
            size = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self._error(400, "bad Content-Length header")
        if not 0 < size <= MAX_BODY_BYTES:
            return self._error(400 if size <= 0 else 413, f"body of {size} bytes: need 1..{MAX_BODY_BYTES}")
        raw = self.rfile.read(size)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._error(400, f"body is not JSON: {e}")
        try:
            answer = self.server.score(body)
        except ValueError as e:
            return self._error(400, str(e))
        except Exception as e:  # noqa: BLE001 -- the server must answer, and log for its operator
            traceback.print_exc(file=sys.stderr)
            return self._error(500, f"{type(e).__name__}: {e}")
        self._send(200, answer)

    def _send(self, code: int, payload: dict) -> None:
        if self.command == "POST":
            self.server.requests.labels(status=str(code)).inc()
        self._write(code, json.dumps(payload).encode(), "application/json")

    def _error(self, code: int, message: str) -> None:
        if self.command == "POST":
            self.server.requests.labels(status=str(code)).inc()
        self.close_connection = True  # the body may be unread: the connection cannot carry another request
        self._write(code, message.encode(), "text/plain; charset=utf-8")

    def _write(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): nothing to answer
            self.close_connection = True

    def log_message(self, format, *args):  # noqa: A002 -- http.server's signature
        if self.server.verbose:
            super().log_message(format, *args)


def serve_in_thread(teacher, host: str = "127.0.0.1", port: int = 0, **kwargs) -> TeacherServer:
    """Start a server on a daemon thread (tests, or a trainer hosting a teacher beside it);
    kwargs go to TeacherServer. Stop it with server.shutdown(); server.server_close()."""
    server = TeacherServer(teacher, host, port, **kwargs)
    threading.Thread(target=server.serve_forever, name=f"teacher-server-{server.url}", daemon=True).start()
    return server

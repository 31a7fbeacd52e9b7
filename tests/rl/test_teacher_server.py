"""Teachers behind tools/serve_teacher.py: a round trip equals the in-process teacher exactly;
bad requests get a 400 with the reason; a server that is down, failing or too slow is retried,
then reported as TeacherUnavailable quickly (small timeouts here) with what to do."""

import contextlib
import importlib.util
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from mimo_train.rl.teacher_server import TeacherServer, serve_in_thread
from mimo_train.rl.teachers import (
    InProcessTeacher,
    RemoteTeacher,
    TeacherSpec,
    TeacherUnavailable,
    check_compatible,
    make_teacher,
)
from mimo_train.rollout import EngineConfig
from tests.rollout.rollout_utils import make_model, random_prompts

ROOT = Path(__file__).resolve().parents[2]
FAST = dict(timeout_s=0.5, retries=2, backoff_s=0.01)  # 3 attempts


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("served"), seed=3, mtp=1)


@pytest.fixture(scope="module")
def teacher(model):
    return InProcessTeacher(TeacherSpec("t-code", "code", str(model.path)),
                            EngineConfig(device="cpu", max_batch=2, max_len=48))


@contextlib.contextmanager
def running(teacher):
    server = serve_in_thread(teacher)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def server(teacher):
    with running(teacher) as s:
        yield s


def post(url, raw: bytes):
    req = urllib.request.Request(url + "/logprobs", data=raw, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    return e.value.code, e.value.read().decode()


def test_round_trip_equals_in_process(model, teacher, server):
    spec = TeacherSpec("t-code", "code", str(model.path), server=server.url)
    remote = make_teacher(spec, **FAST)
    assert isinstance(remote, RemoteTeacher) and isinstance(make_teacher(TeacherSpec("x", "y", str(model.path))),
                                                            InProcessTeacher)
    assert remote.vocab_size == teacher.vocab_size and remote.max_len == teacher.max_len == 48
    assert remote.info() == teacher.info()
    check_compatible(model.cfg.vocab_size, None, [remote])
    prompts = random_prompts(model.cfg, [3, 11, 1], seed=7)
    responses = random_prompts(model.cfg, [6, 2, 0], seed=8)
    for t in (1.0, 0.6):
        got, want = remote.logprobs(prompts, responses, t), teacher.logprobs(prompts, responses, t)
        assert all(torch.equal(a, b) for a, b in zip(got, want))  # floats survive JSON exactly


def test_bad_requests_get_400(model, teacher, server):
    v = model.cfg.vocab_size
    cases = [(b"{not json", "not JSON"),
             (b"[1, 2]", "JSON object"),
             (json.dumps({"prompts": [[1]]}).encode(), "expected keys"),
             (json.dumps({"prompts": [[1, v]], "responses": [[2]]}).encode(), "outside the vocabulary"),
             (json.dumps({"prompts": [[1] * 40], "responses": [[2] * 9]}).encode(), "max_len 48"),
             (json.dumps({"prompts": [[1]], "responses": [[2]], "temperature": "hot"}).encode(), "temperature")]
    for raw, message in cases:
        code, text = post(server.url, raw)
        assert code == 400 and message in text, (raw, text)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url + "/nothing", timeout=5)
    assert e.value.code == 404
    # A 400 is the caller's bug: raised at once as ValueError, not retried as an outage.
    remote = RemoteTeacher(TeacherSpec("t-code", "code", "ckpt", server=server.url), **FAST)
    with pytest.raises(ValueError, match=r"refused the request \(HTTP 400\): prompt 0 has token ids outside"):
        remote.logprobs([[v + 5]], [[1]])
    assert teacher.logprobs([[1]], [[2]])[0].shape == (1,)  # the server still serves


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_retries_then_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(TeacherUnavailable) as e:
        RemoteTeacher(TeacherSpec("math-teacher", "math", "runs/math/checkpoints", server=url), **FAST)
    assert time.perf_counter() - start < 3
    msg = str(e.value)
    for part in ("'math-teacher'", url, "after 3 attempts", "ConnectionRefusedError",
                 "python tools/serve_teacher.py --ckpt runs/math/checkpoints"):
        assert part in msg, (part, msg)


class ScriptedTeacher:
    """Answers /info at once; /logprobs sleeps, or fails the first `failures` calls."""

    def __init__(self, sleep_s=0.0, failures=0):
        self.sleep_s, self.failures, self.calls = sleep_s, failures, 0

    def info(self):
        return dict(name="scripted", vocab_size=10, tokenizer_fingerprint=None, max_len=32)

    def logprobs(self, prompts, responses, temperature=1.0):
        self.calls += 1
        time.sleep(self.sleep_s)
        if self.calls <= self.failures:
            raise RuntimeError("CUDA out of memory (scripted)")
        return [torch.full((len(r),), -0.5) for r in responses]


def test_slow_server_times_out_then_clear_error():
    with running(ScriptedTeacher(sleep_s=3.0)) as s:
        remote = RemoteTeacher(TeacherSpec("slow", "agent", "ckpt", server=s.url), timeout_s=0.2, retries=1,
                               backoff_s=0.01)
        start = time.perf_counter()
        with pytest.raises(TeacherUnavailable, match=r"after 2 attempts .*timed out after 0.2s"):
            remote.logprobs([[1, 2]], [[3]])
        assert time.perf_counter() - start < 2.0  # well under the 3 s the server takes


def test_server_errors_are_retried():
    scripted = ScriptedTeacher(failures=1)
    with running(scripted) as s:
        remote = RemoteTeacher(TeacherSpec("flaky", "math", "ckpt", server=s.url), **FAST)
        assert remote.logprobs([[1]], [[2, 3]])[0].tolist() == [-0.5, -0.5]
        assert scripted.calls == 2
        scripted.failures = 10
        with pytest.raises(TeacherUnavailable, match="HTTP 500: RuntimeError: CUDA out of memory"):
            remote.logprobs([[1]], [[2]])


def cli():
    spec = importlib.util.spec_from_file_location("serve_teacher", ROOT / "tools" / "serve_teacher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line(model, teacher, capsys, monkeypatch, tmp_path):
    # In-process: a fresh interpreter would spend most of the test budget importing megatron.
    args = ["--ckpt", str(model.path), "--port", "0", "--name", "cli", "--max-batch", "2", "--max-len", "48",
            "--device", "cpu"]
    with running(cli().make_server(args).teacher) as s:
        remote = RemoteTeacher(TeacherSpec("cli", "code", str(model.path), server=s.url), **FAST)
        prompts, responses = random_prompts(model.cfg, [4], seed=9), random_prompts(model.cfg, [5], seed=10)
        assert torch.equal(remote.logprobs(prompts, responses)[0], teacher.logprobs(prompts, responses)[0])
    # main() prints {"url": ...} as the first stdout line before serving (serving stubbed out here).
    monkeypatch.setattr(TeacherServer, "serve_forever", lambda self: None)
    cli().main(args)
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["url"].startswith("http://127.0.0.1:") and first["name"] == "cli" and first["max_len"] == 48
    with pytest.raises(SystemExit, match=f"teacher 'missing'.*no checkpoint at {tmp_path / 'nope'}"):
        cli().main(["--ckpt", str(tmp_path / "nope"), "--name", "missing"])


def scrape(url: str) -> dict[str, float]:
    """GET /metrics -> {sample name with labels: value} (Prometheus text format)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_metrics_count_requests_tokens_and_time(model, teacher):
    """A fresh server (the module's is shared): what Prometheus scrapes moves with the traffic."""
    with running(teacher) as s:
        assert scrape(s.url)["mimo_teacher_scored_tokens_total"] == 0
        remote = RemoteTeacher(TeacherSpec("t-code", "code", "ckpt", server=s.url), **FAST)
        remote.logprobs(random_prompts(model.cfg, [3, 4], seed=1), random_prompts(model.cfg, [5, 2], seed=2))
        assert post(s.url, b"{not json")[0] == 400
        after = scrape(s.url)
    assert after["mimo_teacher_scored_tokens_total"] == 7
    assert after['mimo_teacher_requests_total{status="200"}'] == 1
    assert after['mimo_teacher_requests_total{status="400"}'] == 1
    assert after["mimo_teacher_score_seconds_count"] == 1 and after["mimo_teacher_score_seconds_sum"] > 0

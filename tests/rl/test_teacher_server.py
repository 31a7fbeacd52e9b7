"""Teachers behind tools/serve_teacher.py: a round trip equals the in-process teacher exactly,
top-k scores included; bad requests get a 400 with the reason; one request's top-k entries are
bounded, and the client splits its calls under the bound; a server that is down, failing or
too slow is retried, then reported as TeacherUnavailable quickly (small timeouts here) with
what to do."""

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

from mimo_train.rl.teacher_server import MAX_TOP_NUMBERS, TeacherServer, serve_in_thread
from mimo_train.rl.teachers import (
    InProcessTeacher,
    RemoteTeacher,
    TeacherSpec,
    TeacherUnavailable,
    TokenScores,
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
def running(teacher, **kwargs):
    server = serve_in_thread(teacher, **kwargs)
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


def post_ok(url, body: dict) -> dict:
    req = urllib.request.Request(url + "/logprobs", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200
        return json.loads(r.read())


def test_round_trip_equals_in_process(model, teacher, server):
    spec = TeacherSpec("t-code", "code", str(model.path), server=server.url)
    remote = make_teacher(spec, **FAST)
    assert isinstance(remote, RemoteTeacher) and isinstance(make_teacher(TeacherSpec("x", "y", str(model.path))),
                                                            InProcessTeacher)
    assert remote.vocab_size == teacher.vocab_size and remote.max_len == teacher.max_len == 48
    assert remote.info() == {**teacher.info(), "max_top_numbers": MAX_TOP_NUMBERS}
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


def assert_same_scores(got: list[TokenScores], want: list[TokenScores], k: int):
    """Equal, not close: float32 values survive JSON exactly."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.top_ids.dtype == torch.long and g.top_logprobs.dtype == g.logprobs.dtype == torch.float32
        assert g.top_ids.shape == g.top_logprobs.shape == (len(w.logprobs), k)
        assert torch.equal(g.logprobs, w.logprobs) and torch.equal(g.top_ids, w.top_ids)
        assert torch.equal(g.top_logprobs, w.top_logprobs)


def test_top_k_equals_in_process(model, teacher, server):
    remote = RemoteTeacher(TeacherSpec("t-code", "code", str(model.path), server=server.url), **FAST)
    v = model.cfg.vocab_size
    prompts = random_prompts(model.cfg, [3, 11, 1, 5], seed=17)
    responses = random_prompts(model.cfg, [6, 2, 0, 9], seed=18)
    for t, k in ((1.0, 0), (1.0, 5), (0.6, 3), (1.0, v)):
        got = remote.score(prompts, responses, t, top_k=k)
        want = teacher.score(prompts, responses, t, top_k=k)
        assert_same_scores(got, want, k)
        assert got[2].top_ids.shape == (0, k)  # an empty response: [0, k]
    # k = the vocabulary: every token once, most likely first, a whole distribution (the
    # sampled token is among them with its own log-prob).
    full = got[3]
    assert torch.equal(full.top_ids.sort(-1).values, torch.arange(v).expand(9, v))
    assert (full.top_logprobs.diff(dim=-1) <= 0).all()
    torch.testing.assert_close(full.top_logprobs.exp().sum(-1), torch.ones(9), atol=1e-5, rtol=0)
    dense = torch.empty(9, v).scatter_(1, full.top_ids, full.top_logprobs)  # back to [tokens, vocab]
    assert torch.equal(dense.gather(1, torch.tensor(responses[3])[:, None]).squeeze(1), full.logprobs)


def test_without_top_k_the_answer_is_unchanged(model, teacher, server):
    """A client that never sends top_k (every client before it existed) gets {"logprobs"} only;
    top_k = 0 is the same answer."""
    prompts, responses = random_prompts(model.cfg, [4, 2], seed=21), random_prompts(model.cfg, [3, 5], seed=22)
    plain = post_ok(server.url, {"prompts": prompts, "responses": responses, "temperature": 0.8})
    assert plain == {"logprobs": [lp.tolist() for lp in teacher.logprobs(prompts, responses, 0.8)]}
    assert post_ok(server.url, {"prompts": prompts, "responses": responses, "temperature": 0.8, "top_k": 0}) == plain
    with_k = post_ok(server.url, {"prompts": prompts, "responses": responses, "temperature": 0.8, "top_k": 2})
    assert with_k["logprobs"] == plain["logprobs"]
    assert [[len(row) for row in r] for r in with_k["top_ids"]] == [[2] * 3, [2] * 5]


def test_bad_top_k_gets_400(model, server):
    v = model.cfg.vocab_size
    for bad in (-1, v + 1, "3", 2.5, True, None):
        code, text = post(server.url, json.dumps({"prompts": [[1]], "responses": [[2]], "top_k": bad}).encode())
        assert code == 400 and f"top_k must be an int in [0, {v}]" in text and repr(bad) in text, (bad, text)
    remote = RemoteTeacher(TeacherSpec("t-code", "code", "ckpt", server=server.url), **FAST)
    with pytest.raises(ValueError, match=r"refused the request \(HTTP 400\): top_k must be an int in"):
        remote.score([[1]], [[2]], top_k=v + 1)
    with pytest.raises(ValueError, match="top_k must be an int >= 0, got -1"):  # caught before any request
        remote.score([[1]], [[2]], top_k=-1)


def test_top_k_entries_per_request_are_bounded(model, teacher):
    """A small limit here (the default, 2M, is what a real batch meets): the server refuses a
    request over it with the fix, and RemoteTeacher splits its calls under the limit /info states,
    with the same scores as one in-process call."""
    with pytest.raises(ValueError, match="max_top_numbers must be an int >= 1"):
        TeacherServer(teacher, max_top_numbers=0)
    with running(teacher, max_top_numbers=20) as s:
        code, text = post(s.url, json.dumps({"prompts": [[1], [2]], "responses": [[3] * 4, [4] * 3],
                                             "top_k": 3}).encode())
        assert code == 400, text
        assert text == ("top_k=3 x 7 response tokens = 21 top-k entries exceeds this server's limit of 20 per "
                        "request: send fewer responses per request (RemoteTeacher splits by /info's "
                        "max_top_numbers) or start the server with a larger --max-top-numbers")
        assert len(post_ok(s.url, {"prompts": [[1]], "responses": [[3] * 5], "top_k": 4})["top_ids"][0]) == 5  # = 20
        remote = RemoteTeacher(TeacherSpec("t-code", "code", "ckpt", server=s.url), **FAST)
        assert remote.max_top_numbers == 20
        prompts = random_prompts(model.cfg, [2, 7, 3, 1], seed=31)
        responses = random_prompts(model.cfg, [6, 2, 0, 5], seed=32)  # x 3: 18 | 6, 0 | 15
        got = remote.score(prompts, responses, top_k=3)
        # Exactly the in-process teacher scoring the same three groups (the split changes how
        # pairs share a forward, so one call over all four differs in the last bits: 1.2e-6 seen).
        want = [s for rows in ([0], [1, 2], [3])
                for s in teacher.score([prompts[i] for i in rows], [responses[i] for i in rows], top_k=3)]
        assert_same_scores(got, want, 3)
        whole = teacher.score(prompts, responses, top_k=3)
        for g, w in zip(got, whole):
            assert torch.equal(g.top_ids, w.top_ids)
            torch.testing.assert_close(g.top_logprobs, w.top_logprobs, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match=r"response 1 has 8 tokens x top_k=3 = 24 top-k entries, over the "
                                             r"server's limit of 20 per request: lower top_k or start "
                                             r"tools/serve_teacher.py with --max-top-numbers 24 or more"):
            remote.score([[1], [2]], [[3], [4] * 8], top_k=3)
        after = scrape(s.url)
    # 1 refused + 1 answered by hand, then three requests for the four pairs; the too-long
    # response was refused by the client, before any request.
    assert after['mimo_teacher_requests_total{status="400"}'] == 1
    assert after['mimo_teacher_requests_total{status="200"}'] == 1 + 3


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

    def score(self, prompts, responses, temperature=1.0, top_k=0):
        self.calls += 1
        time.sleep(self.sleep_s)
        if self.calls <= self.failures:
            raise RuntimeError("CUDA out of memory (scripted)")
        return [TokenScores(torch.full((len(r),), -0.5), torch.zeros(len(r), top_k, dtype=torch.long),
                            torch.zeros(len(r), top_k)) for r in responses]


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
            "--device", "cpu", "--max-top-numbers", "1000"]
    with running(cli().make_server(args).teacher) as s:
        remote = RemoteTeacher(TeacherSpec("cli", "code", str(model.path), server=s.url), **FAST)
        prompts, responses = random_prompts(model.cfg, [4], seed=9), random_prompts(model.cfg, [5], seed=10)
        assert torch.equal(remote.logprobs(prompts, responses)[0], teacher.logprobs(prompts, responses)[0])
    # main() prints {"url": ...} as the first stdout line before serving (serving stubbed out here).
    monkeypatch.setattr(TeacherServer, "serve_forever", lambda self: None)
    cli().main(args)
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["url"].startswith("http://127.0.0.1:") and first["name"] == "cli" and first["max_len"] == 48
    assert first["max_top_numbers"] == 1000
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

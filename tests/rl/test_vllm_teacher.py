"""MOPD teachers on real vLLM servers: the scores (sampled-token log-probs and the top-k of each
next-token distribution) are the in-process teacher's; teachers that share a checkpoint share a
server; a server started elsewhere is reached by URL; the servers expose Prometheus /metrics;
a wrong request or a dead server is one clear error."""

import random
from types import SimpleNamespace

import pytest
import torch

from mimo_train.rl.config import RLConfig, VLLMConfig
from mimo_train.rl.teachers import InProcessTeacher, TeacherSpec, TeacherUnavailable
from mimo_train.rl.vllm_teacher import VLLMTeachers
from mimo_train.rollout import EngineConfig
from tests.rollout.vllm_utils import server_groups, vllm

pytestmark = vllm
MAX_LEN, TOP_K, TOL = 64, 5, 1e-4


def run_config(tmp_path, rl_data, **rl) -> SimpleNamespace:
    return SimpleNamespace(rollout=SimpleNamespace(vllm=VLLMConfig(kv_cache_gb=0.125)), run_dir=tmp_path,
                           data=SimpleNamespace(tokenizer=str(rl_data / "tokenizer")),
                           rl=RLConfig(teacher_timeout_s=60, teacher_retries=1, **rl))


@pytest.fixture(scope="module")
def served(teacher32, rl_data, tmp_path_factory):
    """Two domains on one checkpoint: one server, started from the training checkpoint."""
    specs = [(TeacherSpec(f"t_{d}", d, str(teacher32), vllm=True), 1) for d in ("sort", "reverse")]
    pool = VLLMTeachers(run_config(tmp_path_factory.mktemp("teachers"), rl_data), specs, MAX_LEN, top_k=TOP_K)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def in_process(teacher32):
    return InProcessTeacher(TeacherSpec("ref", "sort", str(teacher32)), EngineConfig(device="cpu", max_batch=4,
                                                                                     max_len=MAX_LEN))


def pairs(vocab: int, n: int = 6, seed: int = 0):
    """Prompts and responses of assorted lengths, up to past the tiny model's window (32)."""
    rng = random.Random(seed)
    lengths = [(3, 1), (5, 9), (12, 30), (1, 4), (20, 40), (7, 0)][:n]
    return ([[rng.randrange(vocab) for _ in range(p)] for p, _ in lengths],
            [[rng.randrange(vocab) for _ in range(r)] for _, r in lengths])


def test_teachers_of_one_checkpoint_share_one_server(served):
    assert len(served.servers) == 1
    assert served.teachers["sort"].url == served.teachers["reverse"].url


def test_scores_equal_the_in_process_teachers(served, in_process, student32):
    prompts, responses = pairs(in_process.vocab_size)
    got = served.teachers["sort"].score(prompts, responses, top_k=TOP_K)
    want = in_process.score(prompts, responses, top_k=TOP_K)
    for g, w, r in zip(got, want, responses):
        assert g.logprobs.shape == (len(r),) and g.top_ids.shape == (len(r), TOP_K)
        assert torch.allclose(g.logprobs, w.logprobs, atol=TOL, rtol=0), (g.logprobs - w.logprobs).abs().max()
        assert torch.allclose(g.top_logprobs, w.top_logprobs, atol=TOL, rtol=0)
        # The same ids, where the k-th and (k+1)-th log-probs are not near-tied.
        distinct = (w.top_logprobs[:, :-1] - w.top_logprobs[:, 1:]).abs().min(-1).values > 1e-3
        assert torch.equal(g.top_ids[distinct], w.top_ids[distinct])
    # The control: another checkpoint's in-process scores are far from the server's.
    other = InProcessTeacher(TeacherSpec("other", "sort", str(student32)), EngineConfig(device="cpu", max_len=MAX_LEN))
    assert (other.logprobs(prompts[2:3], responses[2:3])[0] - got[2].logprobs).abs().max() > 100 * TOL


def test_sampled_token_logprobs_are_what_the_loop_uses(served, in_process):
    prompts, responses = pairs(in_process.vocab_size, seed=1)
    for g, w in zip(served.teachers["reverse"].logprobs(prompts, responses, 1.0), in_process.logprobs(prompts, responses)):
        assert torch.allclose(g, w, atol=TOL, rtol=0)


def test_temperature_other_than_one_is_refused_with_the_fix(served):
    with pytest.raises(ValueError, match=r"temperature 1; asked for 0.7: set rl.temperature=1 or run this teacher in-process"):
        served.teachers["sort"].logprobs([[1, 2]], [[3]], 0.7)


def test_bad_token_ids_are_refused_before_the_server(served):
    with pytest.raises(ValueError, match=r"response 0 has token ids outside the vocabulary"):
        served.teachers["sort"].logprobs([[1, 2]], [[10 ** 6]])


def test_a_server_started_elsewhere_is_reached_by_url(served, rl_data, tmp_path, in_process):
    url = served.teachers["sort"].url
    pool = VLLMTeachers(run_config(tmp_path, rl_data), [(TeacherSpec("remote", "sort", "unused", server=url, vllm=True), 1)],
                        MAX_LEN)
    teacher = pool.teachers["sort"]
    assert not pool.servers and teacher.vocab_size == in_process.vocab_size and teacher.max_len == MAX_LEN
    assert teacher.tokenizer_fingerprint == in_process.tokenizer_fingerprint
    prompts, responses = pairs(in_process.vocab_size, n=3)
    for g, w in zip(teacher.logprobs(prompts, responses), in_process.logprobs(prompts, responses)):
        assert torch.allclose(g, w, atol=TOL, rtol=0)


def test_every_server_answers_prometheus_metrics(served):
    text = served.teachers["sort"].client.call("GET", "/metrics", raw=True)
    assert "vllm:prompt_tokens_total" in text


def test_a_dead_server_is_retried_then_reported_in_one_line(teacher32, rl_data, tmp_path):
    import os
    import signal

    pool = VLLMTeachers(run_config(tmp_path, rl_data), [(TeacherSpec("doomed", "sort", str(teacher32), vllm=True), 1)],
                        MAX_LEN)
    try:
        for group in server_groups(str(tmp_path)):
            os.kill(group, signal.SIGKILL)
        pool.servers[0].proc.wait(60)  # the watchdog has seen its server go
        with pytest.raises(TeacherUnavailable, match=r"teacher 'doomed' \(domain 'sort'\) on vLLM at .*: the server has "
                                                     r"stopped: .*command `.*` \(log: .*server.log\)"):
            pool.teachers["sort"].logprobs([[1, 2]], [[3]])
    finally:
        pool.close()
    assert not server_groups(str(tmp_path))

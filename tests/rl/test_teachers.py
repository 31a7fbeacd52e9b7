"""MOPD teachers in-process: scoring equals transformers' full forward (fp32, 1e-5) at any
temperature, a teacher equal to the student reproduces the student engine's own sampled
log-probs, scoring leaves running requests alone, and bad input (mismatched vocabulary or
tokenizer, missing checkpoint, data rows without a domain or teacher) fails with clear errors."""

import shutil

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mimo_train.data.tokenizer import build_tokenizer
from mimo_train.rl.teachers import (
    InProcessTeacher,
    TeacherMismatch,
    TeacherSpec,
    TokenScores,
    check_compatible,
    check_domains,
    route,
    score_tokens,
)
from mimo_train.rl.batch import Sample
from mimo_train.rl.loop import score_samples
from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from tests.rollout.rollout_utils import full_forward_logits, make_model, random_prompts

CPU = dict(device="cpu", max_len=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("teacher"), seed=2, mtp=1)


@pytest.fixture(scope="module")
def teacher(model):
    # max_batch 2: five pairs take three batches of mixed lengths.
    return InProcessTeacher(TeacherSpec("t-math", "math", str(model.path)), EngineConfig(max_batch=2, **CPU))


def reference(hf, prompt, response, t):
    if not response:
        return torch.zeros(0, dtype=torch.float64)
    logits = full_forward_logits(hf, prompt, response) / t
    return logits.log_softmax(-1).gather(1, torch.tensor(response)[:, None]).squeeze(1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scores_equal_full_forward(model, teacher, temperature):
    w = model.cfg.sliding_window_size
    prompts = random_prompts(model.cfg, [1, 3, 2 * w + 1, 9, 4], seed=1)
    responses = random_prompts(model.cfg, [5, 1, 2 * w + 3, 12, 0], seed=2)
    out = teacher.logprobs(prompts, responses, temperature)
    for p, r, lp in zip(prompts, responses, out):
        assert lp.dtype == torch.float32 and lp.shape == (len(r),) and not lp.is_inference()
        if not r:
            continue
        assert (lp.double() - reference(model.hf, p, r, temperature)).abs().max().item() <= 1e-5
    if temperature != 1.0:  # the temperature really changes the numbers
        assert not torch.allclose(out[3], teacher.logprobs(prompts[3:4], responses[3:4])[0], atol=1e-3)


def test_top_k_is_the_head_of_the_full_forward_distribution(model, teacher):
    """What distribution-level distillation reads: the k most likely next tokens at each
    response position, and their log-probs at the temperature asked for."""
    prompts = random_prompts(model.cfg, [3, 8], seed=3)
    responses = random_prompts(model.cfg, [6, 11], seed=4)
    k, t = 4, 0.8
    for p, r, s in zip(prompts, responses, teacher.score(prompts, responses, t, top_k=k)):
        full = (full_forward_logits(model.hf, p, r) / t).log_softmax(-1)
        values, ids = full.topk(k, dim=-1)
        assert s.top_ids.shape == (len(r), k) and s.top_logprobs.dtype == torch.float32
        assert torch.equal(s.top_ids, ids)
        assert (s.top_logprobs.double() - values).abs().max().item() <= 1e-5
        assert (s.logprobs.double() - reference(model.hf, p, r, t)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, max_new_tokens=12, n=2, seed=5),
                                    SamplingParams(temperature=0.0, max_new_tokens=12)])
def test_student_equal_to_teacher_gives_its_sampled_logprobs(model, teacher, params):
    student = Engine.from_pretrained(model.path, EngineConfig(max_batch=4, **CPU))
    completions, _ = student.generate(random_prompts(model.cfg, [4, 7], seed=3), params)
    scored = teacher.logprobs([c.prompt for c in completions], [c.tokens for c in completions], params.temperature)
    for c, lp in zip(completions, scored):
        assert (lp - torch.tensor(c.logprobs)).abs().max().item() <= 1e-5


def test_scoring_between_steps_leaves_running_requests_alone(model, teacher):
    prompts = random_prompts(model.cfg, [5, 8], seed=4)
    params = SamplingParams(temperature=0.9, max_new_tokens=10, seed=11, ignore_eos=True)
    expected, _ = Engine.from_pretrained(model.path, EngineConfig(max_batch=3, **CPU)).generate(prompts, params)

    engine = Engine.from_pretrained(model.path, EngineConfig(max_batch=3, **CPU))
    for i, p in enumerate(prompts):
        engine.add_request(p, params, prompt_index=i)
    done = engine.step() + engine.step()
    assert engine.n == 2  # both running: one free row left for scoring, which takes two batches
    others, resp = random_prompts(model.cfg, [6, 2], seed=5), random_prompts(model.cfg, [4, 3], seed=6)
    scored = [s.logprobs for s in score_tokens(engine, others, resp, 0.9)]
    for got, want in zip(scored, teacher.logprobs(others, resp, 0.9)):
        assert (got - want).abs().max().item() <= 1e-5
    while len(done) < 2:
        done += engine.step()
    done.sort(key=lambda c: c.prompt_index)
    assert [c.tokens for c in done] == [c.tokens for c in expected]
    assert [c.logprobs for c in done] == [c.logprobs for c in expected]

    engine.add_request(prompts[0], params)
    engine.add_request(prompts[1], SamplingParams(n=2, max_new_tokens=10, ignore_eos=True))
    engine.step()
    with pytest.raises(RuntimeError, match="every slot"):
        score_tokens(engine, others, resp)


def test_bad_scoring_input(teacher):
    v = teacher.vocab_size
    cases = [
        (([[1] * 40], [[2] * 25]), "exceeds the teacher engine's max_len 64"),
        (([[1, v]], [[2]]), r"prompt 0 has token ids outside the vocabulary"),
        (([[1], [1]], [[2], [-1]]), r"response 1 has token ids outside"),
        (([[]], [[2]]), "prompt 0 is empty"),
        (([[1]], [[2], [3]]), "1 prompts but 2 responses"),
        (([["a"]], [[2]]), "prompt 0 must be a list of int"),
    ]
    for (prompts, responses), message in cases:
        with pytest.raises(ValueError, match=message):
            teacher.logprobs(prompts, responses)
    with pytest.raises(ValueError, match="temperature"):
        teacher.logprobs([[1]], [[2]], temperature=-1.0)


def test_missing_checkpoint_names_teacher_and_path(tmp_path):
    path = tmp_path / "runs" / "code-teacher" / "checkpoints"
    with pytest.raises(FileNotFoundError) as e:
        InProcessTeacher(TeacherSpec("coder", "code", str(path)))
    assert "'coder'" in str(e.value) and str(path) in str(e.value) and "'code'" in str(e.value)


def test_vocab_mismatch_names_both(model, teacher, tmp_path):
    other = make_model(tmp_path / "other", seed=2, mtp=0, vocab=model.cfg.vocab_size + 3)
    wide = InProcessTeacher(TeacherSpec("wide", "code", str(other.path)), EngineConfig(max_batch=1, **CPU))
    check_compatible(model.cfg.vocab_size, None, [teacher])
    with pytest.raises(TeacherMismatch) as e:
        check_compatible(model.cfg.vocab_size, None, {"math": teacher, "code": wide})
    msg = str(e.value)
    assert "'wide'" in msg and f"vocab size {model.cfg.vocab_size + 3}" in msg
    assert f"student has {model.cfg.vocab_size}" in msg and str(other.path) in msg


def save_shuffled_tokenizer(directory):
    """Same size and tokens as the project's tokenizer, two ids swapped: only the mapping differs."""
    vocab = build_tokenizer(directory / "tmp").get_vocab()
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                            eos_token="<eos>").save_pretrained(str(directory))


def test_tokenizer_mismatch_names_both(model, tmp_path):
    student_tok = tmp_path / "student_tok"
    build_tokenizer(student_tok)
    same, shuffled = tmp_path / "same", tmp_path / "shuffled"
    for d in (same, shuffled):
        shutil.copytree(model.path, d, ignore=shutil.ignore_patterns("hf"))
    build_tokenizer(same)
    save_shuffled_tokenizer(shuffled)
    ok = InProcessTeacher(TeacherSpec("same", "math", str(same)), EngineConfig(max_batch=1, **CPU))
    bad = InProcessTeacher(TeacherSpec("shuffled", "code", str(shuffled)), EngineConfig(max_batch=1, **CPU))
    assert ok.tokenizer_dir == same and ok.tokenizer_fingerprint != bad.tokenizer_fingerprint
    check_compatible(model.cfg.vocab_size, student_tok, [ok])
    check_compatible(model.cfg.vocab_size, None, [ok, bad])  # the student's tokenizer unknown: sizes only
    with pytest.raises(TeacherMismatch, match="different tokenizer") as e:
        check_compatible(model.cfg.vocab_size, student_tok, [ok, bad])
    assert "'shuffled'" in str(e.value) and str(shuffled) in str(e.value) and str(student_tok) in str(e.value)


class FakeTeacher:
    def __init__(self, name, domain, value):
        self.name, self.domain, self.value = name, domain, value

    def logprobs(self, prompts, responses, temperature=1.0):
        return [torch.full((len(r),), self.value) for r in responses]

    def score(self, prompts, responses, temperature=1.0, top_k=0):
        return [TokenScores(lp, torch.zeros(len(lp), top_k, dtype=torch.long), torch.zeros(len(lp), top_k))
                for lp in self.logprobs(prompts, responses, temperature)]


def test_routing_by_domain():
    math, code = FakeTeacher("m", "math", -1.0), FakeTeacher("c", "code", -2.0)
    teachers = {"math": math, "code": code}
    domains = ["code", "math", "code", "math"]
    assert route(domains, teachers) == [(code, [0, 2]), (math, [1, 3])]
    assert route([{"domain": "math", "prompt": "x"}], [math, code]) == [(math, [0])]
    samples = [Sample([1], r, [0.0] * len(r), domain=d) for d, r in zip(domains, [[1], [1, 2], [3], []])]
    metrics = score_samples(samples, teachers, None, 1.0)
    assert [s.teacher_logprobs for s in samples] == [[-2.0], [-1.0, -1.0], [-2.0], []]
    assert metrics == {"teacher_kl/code": 2.0, "teacher_kl/math": 1.0}
    with pytest.raises(ValueError, match=r"no teacher for domain\(s\) \{'chat': 1\}"):  # never a silent zero
        score_samples([Sample([1], [2], [0.0], domain="chat")], teachers, None, 1.0)

    with pytest.raises(ValueError, match=r"data row 1 has no 'domain' field: MOPD routes each prompt"):
        check_domains([{"domain": "math"}, {"prompt": "x"}], teachers)
    with pytest.raises(ValueError, match="data row 2 has no 'domain'"):
        check_domains(["math", "code", None], teachers)
    with pytest.raises(ValueError, match=r"no teacher for domain\(s\) \{'agent': 2, 'chat': 1\}") as e:
        route(["math", "agent", "chat", "agent"], teachers)
    assert "['code', 'math']" in str(e.value)
    with pytest.raises(ValueError, match="domain 'math' has two teachers"):
        check_domains(["math"], [math, FakeTeacher("m2", "math", 0.0)])


def test_each_sample_is_scored_by_its_own_domains_teacher(model, teacher, tmp_path):
    """Two different teachers (different weights): a routing bug that scored any domain with the
    wrong one would change these numbers, which a test with one teacher for all could not see."""
    other = InProcessTeacher(TeacherSpec("t-code", "code", str(make_model(tmp_path, seed=7, mtp=1).path)),
                             EngineConfig(max_batch=2, **CPU))
    prompts = random_prompts(model.cfg, [3, 5, 4, 6, 2], seed=11)
    responses = random_prompts(model.cfg, [4, 2, 5, 3, 6], seed=12)
    domains = ["code", "math", "math", "code", "math"]
    samples = [Sample(p, r, [0.0] * len(r), domain=d) for p, r, d in zip(prompts, responses, domains)]
    score_samples(samples, {"math": teacher, "code": other}, None, 1.0)
    for s in samples:
        mine, theirs = (teacher, other) if s.domain == "math" else (other, teacher)
        got = torch.tensor(s.teacher_logprobs)
        assert (got - mine.logprobs([s.prompt], [s.response])[0]).abs().max() <= 1e-5  # batched alone: same up to fp
        assert (got - theirs.logprobs([s.prompt], [s.response])[0]).abs().max() > 0.1

"""tools/accept_law.py, the accept-length law as a check: a prompt's H is the entropy of the
target's next-token distributions over its generated positions (as transformers' forward of the
same weights computes it), its accept length is what the engine's drafts counted, and the fit
recovers the law that made a set of points -- and does not find the report's exponent in points
made by another law."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from tests.rollout.rollout_utils import full_forward_logits, make_model, random_prompts

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("accept_law", ROOT / "tools" / "accept_law.py")
accept_law = importlib.util.module_from_spec(spec)
sys.modules["accept_law"] = accept_law  # its dataclass looks its module up there
spec.loader.exec_module(accept_law)

K = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Random weights, 3 MTP layers drafting "repeat the last token" (accepted now and then), and
    the synthetic tasks' tokenizer beside them, as an export with --tokenizer leaves it."""
    from mimo_train.data.tokenizer import build_tokenizer

    m = make_model(tmp_path_factory.mktemp("accept_law"), seed=2, repeat_drafts=True)
    build_tokenizer(m.path)
    return m


def test_entropy_is_the_targets_and_accept_length_the_drafts(model):
    engine = Engine.from_pretrained(model.path, EngineConfig(device="cpu", max_batch=4, max_len=96))
    window = model.cfg.sliding_window_size
    prompts = random_prompts(model.cfg, [2 * window + 1, 3, 6], seed=4)
    completions, _ = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=20, n=2, seed=5),
                                     depth=K)
    points = accept_law.points_of(completions, accept_law.TargetScorer(engine))

    assert [p.prompt_index for p in points] == [0, 1, 2]
    for p in points:
        samples = [c for c in completions if c.prompt_index == p.prompt_index]
        # Independent of the tool's forward: transformers' model of the same main weights.
        h = []
        for c in samples:
            logp = full_forward_logits(model.hf, c.prompt, c.tokens).log_softmax(-1)
            h += (-(logp.exp() * logp).sum(-1)).tolist()
        assert p.tokens == len(h) == sum(len(c.tokens) for c in samples)
        assert abs(p.entropy - sum(h) / len(h)) <= 1e-5
        # Tokens per verify step as the samples' own counters have them, pooled by hand.
        steps = sum(c.drafts.steps for c in samples)
        assert p.steps == steps > 0
        assert p.accept_length == sum(c.drafts.tokens for c in samples) / steps
        assert 1 <= p.accept_length <= K + 1
        # Every generated token but each sample's first (the prefill's) came from a verify step.
        assert sum(c.drafts.tokens for c in samples) == p.tokens - len(samples)
    # The drafts were tested both ways: some accepted, some rejected.
    assert any(c.drafts.accepted[0] > 0 for c in completions)
    assert any(c.drafts.accepted[0] < c.drafts.proposed[0] for c in completions)


def report_r2_by_hand(H, y):
    """R^2 of 4 (1 - 0.58 H^0.58) on the points, written out."""
    mean = sum(y) / len(y)
    residual = sum((yi - 4 * (1 - 0.58 * hi ** 0.58)) ** 2 for hi, yi in zip(H, y))
    return 1 - residual / sum((yi - mean) ** 2 for yi in y)


def synthetic(a, b, noise, n=80, seed=0):
    rng = np.random.default_rng(seed)
    H = rng.uniform(0.02, 2.5, n)
    y = 4 * (1 - a * H ** b) + rng.normal(0, noise, n) if noise else 4 * (1 - a * H ** b)
    return H.tolist(), y.tolist()


def test_fit_recovers_the_law_that_made_the_points():
    H, y = synthetic(0.58, 0.58, noise=0)
    exact = accept_law.fit_law(H, y, K)
    assert exact["a"] == pytest.approx(0.58, abs=1e-6) and exact["b"] == pytest.approx(0.58, abs=1e-6)
    assert exact["r2"] == pytest.approx(1.0, abs=1e-9)

    H, y = synthetic(0.58, 0.58, noise=0.03)
    fit = accept_law.fit_law(H, y, K)
    assert fit["a"] == pytest.approx(0.58, abs=0.03) and fit["b"] == pytest.approx(0.58, abs=0.05)
    report = accept_law.goodness(H, y, 0.58, 0.58, K)
    assert report["r2"] == pytest.approx(report_r2_by_hand(H, y), abs=1e-12)
    assert report["mae"] == pytest.approx(np.mean([abs(yi - 4 * (1 - 0.58 * hi ** 0.58)) for hi, yi in zip(H, y)]))
    # Least squares: nothing, the report's own curve included, fits the points better.
    assert fit["r2"] >= report["r2"]


def test_fit_does_not_find_the_report_law_in_another_law():
    H, y = synthetic(0.3, 1.5, noise=0.03, seed=1)
    fit = accept_law.fit_law(H, y, K)
    assert fit["b"] == pytest.approx(1.5, abs=0.1) and abs(fit["b"] - 0.58) > 0.5
    assert fit["a"] == pytest.approx(0.3, abs=0.03)
    report = accept_law.goodness(H, y, 0.58, 0.58, K)
    assert report["r2"] == pytest.approx(report_r2_by_hand(H, y), abs=1e-12)
    assert fit["r2"] > 0.95 > report["r2"]


def write_prompts(path: Path, n: int) -> Path:
    rows = [{"domain": "sort", "prompt": f"sort:{w}="} for w in ["cfbuzn", "qdkd", "pobaj", "kqv", "svssfy"][:n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_main_writes_the_json_and_the_plot(model, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "eval.jsonl", 4)
    out = tmp_path / "law"
    result = accept_law.main(["--model", str(model.path), "--prompts", str(prompts), "--max-new-tokens", "12",
                              "--samples", "2", "--device", "cpu", "--out", str(out)])
    written = json.loads((out / "accept_law.json").read_text())
    assert written == json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert written["depth"] == K and written["samples_per_prompt"] == 2 and len(written["points"]) == 4
    used = [p for p in written["points"] if p["accept_length"] is not None]
    assert written["n"] == len(used) and all(1 <= p["accept_length"] <= K + 1 for p in used)
    # The figures' numbers are the points': the fit and the report's curve recomputed from them.
    H, y = [p["entropy"] for p in used], [p["accept_length"] for p in used]
    assert written["fit"] == accept_law.fit_law(H, y, K)
    assert written["report_curve"]["r2"] == pytest.approx(report_r2_by_hand(H, y), abs=1e-12)
    assert written["commit"] and written["device"] == "cpu" and "--samples 2" in written["command"]
    assert (out / "accept_law.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("case,needle", [
    ("no_model", "no serving directory"),
    ("depth", "--depth 4 is outside [1, 3]"),
    ("no_prompts", "holds no rows"),
])
def test_bad_input_is_one_line(model, tmp_path, capsys, case, needle):
    prompts = write_prompts(tmp_path / "eval.jsonl", 0 if case == "no_prompts" else 3)
    argv = ["--model", str(tmp_path / "missing") if case == "no_model" else str(model.path), "--prompts",
            str(prompts), "--device", "cpu", "--out", str(tmp_path / "law"), "--no-plot"]
    with pytest.raises(SystemExit) as err:
        accept_law.main(argv + (["--depth", "4"] if case == "depth" else []))
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("accept_law: error: ") and needle in lines[0]
    assert not (tmp_path / "law").exists()

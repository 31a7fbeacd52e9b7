"""Evaluation (mimo_train/rl/evaluate.py, tools/evaluate.py): scoring proven with a stub engine
whose answers are right or wrong by construction; a tiny random model and the command line run
end to end; bad input is one `error:` line and exit status 2."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil

import pytest

from mimo_train.data.packing import pretrain_document, sft_document
from mimo_train.data.tasks import DOMAINS, generate, write_jsonl
from mimo_train.data.tokenizer import build_tokenizer, encode
from mimo_train.rl.evaluate import (EvalError, evaluate, format_table, limit_rows, load_eval_rows, plot_table,
                                    response_text, write_report)
from mimo_train.rollout.api import Completion
from tests.training.runs import ROOT


def _tool():
    spec = importlib.util.spec_from_file_location("evaluate_tool", ROOT / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("eval_tok") / "tokenizer")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_data")
    spec = importlib.util.spec_from_file_location("make_data_for_eval", ROOT / "tools" / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    make_data.make(out, kind="sft", n=5, n_eval=4, seed=0)
    return out


@pytest.fixture(scope="module")
def serving_dir(tmp_path_factory, tokenizer):
    """A random-weights serving dir (no tokenizer files) whose vocabulary is the tokenizer's."""
    from tests.rollout.rollout_utils import make_model

    return make_model(tmp_path_factory.mktemp("eval_model"), seed=3, vocab=len(tokenizer), mtp=1).path


class StubEngine:
    """Answers each prompt with a scripted token list and records what it was asked; the
    completions come back in reverse order so the scorer must use `prompt_index`."""

    def __init__(self, replies: dict[tuple[int, ...], list[int]]):
        self.replies, self.asked, self.params = replies, [], []

    def generate(self, prompts, params):
        self.asked += [list(p) for p in prompts]
        self.params.append(params)
        out = [Completion(i, i, 0, list(p), self.replies[tuple(p)], [], "stop", 0, 0) for i, p in enumerate(prompts)]
        return out[::-1], None


def test_scoring_counts_exactly_what_was_constructed(tokenizer):
    rows = [*generate("arithmetic", 3, 1), *generate("sort", 4, 1), *generate("reverse", 2, 1)]
    random.Random(0).shuffle(rows)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    right = {"arithmetic": 2, "sort": 1, "reverse": 2}  # how many rows of each domain get the exact answer
    replies, seen = {}, {d: 0 for d in right}
    for row in rows:
        # The question must be asked exactly as training documents begin (SFT and pretrain alike):
        # bos + prompt, with the answer and then eos as the trained continuation.
        p, a = encode(tokenizer, row["prompt"]), encode(tokenizer, row["answer"])
        sft = sft_document(p, a, bos, eos)
        asked = tuple(sft.tokens[:sft.targets.index(True)])
        assert list(asked) == pretrain_document(p + a, bos, eos).tokens[:len(asked)]
        good = seen[row["domain"]] < right[row["domain"]]
        seen[row["domain"]] += 1
        # Right answers end at eos (anything after it is ignored); wrong ones are near misses.
        replies[asked] = a + [eos] + encode(tokenizer, "99") if good else a + encode(tokenizer, "1") + [eos]
    engine = StubEngine(replies)
    result = evaluate(engine, tokenizer, rows, max_new_tokens=7, batch_size=4)
    assert result == {"arithmetic": 2 / 3, "reverse": 1.0, "sort": 1 / 4, "overall": 5 / 9}
    assert len(engine.asked) == len(rows) and len(engine.params) == 3  # batches of 4, 4, 1
    params = engine.params[0]
    assert params.temperature == 0 and params.max_new_tokens == 7 and params.stop_token_ids == (eos,)


def test_response_text_credits_only_produced_characters(tokenizer):
    one, two = encode(tokenizer, "1"), encode(tokenizer, "2")
    assert response_text(tokenizer, one + two + [tokenizer.eos_token_id] + one) == "12"
    assert response_text(tokenizer, one + two) == "12"  # stopped by length: still the exact text
    # A special token or an id beyond the tokenizer (a padded model vocabulary) is not dropped.
    assert response_text(tokenizer, one + [len(tokenizer) + 5] + two) != "12"
    assert response_text(tokenizer, one + [tokenizer.pad_token_id] + two) != "12"


def test_tiny_model_runs_over_every_domain(serving_dir, data_dir, tokenizer):
    from mimo_train.rl.policy_io import load_engine

    rows = limit_rows(load_eval_rows(data_dir / "eval" / "eval.jsonl"), 2)
    engine = load_engine(serving_dir, max_batch=4, max_len=32)
    assert engine.tokenizer_dir is None
    result = evaluate(engine, tokenizer, rows, max_new_tokens=6, batch_size=4)
    assert set(result) == {*DOMAINS, "overall"}
    assert all(0.0 <= v <= 1.0 for v in result.values())
    assert result["overall"] <= 0.5  # random weights answer almost nothing right


def test_cli_end_to_end(serving_dir, data_dir, tokenizer, tmp_path, capsys):
    with_tokenizer = tmp_path / "with_tokenizer"  # a serving dir that carries its tokenizer files
    shutil.copytree(serving_dir, with_tokenizer)
    tokenizer.save_pretrained(str(with_tokenizer))
    out = tmp_path / "report"
    summary = _tool().main(["--model", f"base={serving_dir}", "--model", f"student={with_tokenizer}",
                            "--data", str(data_dir), "--tokenizer", str(data_dir / "tokenizer"), "--limit", "1",
                            "--max-new-tokens", "5", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert list(summary["results"]) == ["base", "student"]
    assert summary["rows"] == {d: 1 for d in DOMAINS}
    # Same weights, same prompts, greedy: the two names score the same.
    assert summary["results"]["base"] == summary["results"]["student"]
    table = (out / "table.md").read_text()
    assert table == summary["table"] and table in printed
    assert table.splitlines()[0] == "| model | " + " | ".join(sorted(DOMAINS)) + " | mean |"
    assert json.loads((out / "results.json").read_text())["results"] == summary["results"]
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Without --tokenizer, the model's own tokenizer files are used.
    again = _tool().main(["--model", f"student={with_tokenizer}", "--data", str(data_dir / "eval"), "--limit", "1",
                          "--max-new-tokens", "5", "--out", str(tmp_path / "again"), "--no-progress"])
    assert again["results"] == {"student": summary["results"]["student"]}


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _tool().main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    return err


def test_cli_errors(serving_dir, data_dir, tmp_path, capsys):
    data = ["--data", str(data_dir), "--out", str(tmp_path / "out"), "--no-progress"]
    missing = tmp_path / "no_such_checkpoint"
    assert str(missing) in _error(["--model", f"base={missing}", *data], capsys)
    assert "records no tokenizer" in _error(["--model", f"base={serving_dir}", "--limit", "1", *data], capsys)
    bad = write_jsonl([{"domain": "sort", "prompt": "sort:cba=", "answer": "abc"},
                       {"domain": "poetry", "prompt": "rhyme:cat=", "answer": "hat"}], tmp_path / "bad.jsonl")
    err = _error(["--model", f"base={serving_dir}", "--data", str(bad), "--no-progress"], capsys)
    assert "line 2" in err and "unknown domain 'poetry'" in err
    assert not (tmp_path / "out").exists()  # nothing is written when the input is bad


def test_malformed_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"domain": "sort", "prompt": "sort:cba="}\n\n{"domain": "sort"}\n')
    with pytest.raises(EvalError, match=rf"{path} line 3: field 'prompt' is missing"):
        load_eval_rows(path)
    path.write_text('{"domain": "sort", "prompt": "sort:cba="\n')
    with pytest.raises(EvalError, match="line 1: not valid JSON"):
        load_eval_rows(path)
    path.write_text('{"domain": "sort", "prompt": "12+3="}\n')  # the checker could not parse it
    with pytest.raises(EvalError, match="line 1: not a sort prompt"):
        load_eval_rows(path)


def test_table_and_plot(tmp_path):
    results = {"base": {"arithmetic": 0.25, "sort": 0.5, "overall": 0.4},
               "teacher": {"arithmetic": 1.0, "reverse": 0.5}}
    assert format_table(results) == (
        "| model | arithmetic | reverse | sort | mean |\n"
        "|---|---:|---:|---:|---:|\n"
        "| base | 0.250 | - | 0.500 | 0.375 |\n"
        "| teacher | 1.000 | 0.500 | - | 0.750 |\n")
    assert plot_table(results, tmp_path / "p.png").stat().st_size > 1000
    files = write_report(results, tmp_path / "r", extra={"rows": {"sort": 2}})
    assert json.loads(open(files["json"]).read()) == {"results": results, "rows": {"sort": 2}}

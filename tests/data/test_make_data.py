"""Specification of tools/make_data.py: synthetic task data + tokenizer, ready for PackedDataset."""

import importlib.util
import json
from pathlib import Path

import pytest

from mimo_train.data.dataset import DataConfig, PackedDataset
from mimo_train.data.tasks import score

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("make_data", ROOT / "tools" / "make_data.py")
make_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_data)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("kind", ["sft", "pretrain"])
def test_writes_checkable_rows_and_a_tokenizer_that_the_dataset_reads(tmp_path, kind):
    summary = make_data.main(["--kind", kind, "--domains", "arithmetic,sort,reverse", "--n", "40", "--seed", "3",
                              "--out", str(tmp_path)])
    train = read(tmp_path / "train.jsonl")
    assert summary["train_rows"] == len(train) == 120
    assert {r["domain"] for r in train} == {"arithmetic", "sort", "reverse"}
    assert [r["domain"] for r in train[:40]] != [train[0]["domain"]] * 40  # domains interleaved
    for r in train:
        assert score(r["domain"], r["prompt"], r["answer"]) == 1.0
        if kind == "sft":
            assert r["response"] == r["answer"]
        else:
            assert r["text"] == r["prompt"] + r["answer"]
    held_out = read(tmp_path / "eval" / "eval.jsonl")
    assert held_out and not {r["prompt"] for r in held_out} & {r["prompt"] for r in train}

    ds = PackedDataset(DataConfig(path=str(tmp_path / "train.jsonl"), tokenizer=str(tmp_path / "tokenizer"),
                                  kind=kind, seq_len=64))
    assert ds.skipped == 0 and ds.num_documents == 120
    whole_dir = PackedDataset(DataConfig(path=str(tmp_path), tokenizer=str(tmp_path / "tokenizer"), kind=kind))
    assert whole_dir.num_documents == 120  # eval/ is a subdirectory: never trained on


def test_same_seed_same_files(tmp_path):
    for name in ("a", "b"):
        make_data.make(tmp_path / name, "sft", ["sort"], n=20, n_eval=5, seed=1)
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()


def test_unknown_domain_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown domain.*known: arithmetic, reverse, rotate, sort"):
        make_data.make(tmp_path, "sft", ["calculus"])

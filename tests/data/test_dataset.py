"""Specification of the dataset: config, sources on disk, bad rows, tokenization and masking."""

import json
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from mimo_train.data.dataset import DataConfig, PackedDataset
from mimo_train.data.tasks import generate
from mimo_train.data.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["12+3=15", "sort:dbca=abcd", "rev:abc=cba", "7-2=5", "sort:zyx=xyz"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def config(path, tok_dir, **kw) -> DataConfig:
    return DataConfig(**{"path": str(path), "tokenizer": tok_dir, "seq_len": 32, "shuffle": False, **kw})


def documents(ds: PackedDataset, tok) -> list[str]:
    """Every real (non-pad) document of the dataset, decoded with its special tokens."""
    out = []
    for i in range(len(ds)):
        s, start = ds[i], 0
        for n in s["doc_lens"]:
            ids = s["tokens"][start:start + n].tolist()
            start += n
            if set(ids) != {tok.pad_token_id}:
                out.append(tok.decode(ids))
    return out


# -- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,allowed", [("kind", "rl", "pretrain, sft"), ("bad_rows", "drop", "skip, error")])
def test_config_rejects_a_bad_choice_naming_the_field_and_the_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=rf"data\.{field}='{value}'.*{allowed}"):
        DataConfig(**{field: value}).validate()


def test_config_rejects_a_tiny_seq_len():
    with pytest.raises(ValueError, match="data.seq_len=1"):
        DataConfig(seq_len=1).validate()


def test_config_defaults_validate():
    DataConfig().validate()


@pytest.mark.parametrize("name", ["synthetic_pretrain", "synthetic_sft"])
def test_the_shipped_data_configs_are_data_configs(name):
    values = yaml.safe_load((ROOT / "configs" / "data" / f"{name}.yaml").read_text())
    DataConfig(**values).validate()


# -- sources ----------------------------------------------------------------------------------

def test_a_missing_path_names_the_path_and_what_was_expected(tmp_path, tok_dir):
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*expected a \.jsonl/\.json/\.parquet/\.arrow file"):
        PackedDataset(config(missing, tok_dir))


def test_a_directory_without_data_files_is_refused(tmp_path, tok_dir):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="no data files"):
        PackedDataset(config(tmp_path, tok_dir))


def test_an_unsupported_file_type_is_refused(tmp_path, tok_dir):
    path = tmp_path / "train.csv"
    path.write_text("text\nabc\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        PackedDataset(config(path, tok_dir))


def test_a_missing_tokenizer_names_the_path(tmp_path, tok_dir):
    path = write_lines(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    with pytest.raises(FileNotFoundError, match=f"data.tokenizer={tmp_path / 'tok'} does not exist"):
        PackedDataset(config(path, str(tmp_path / "tok")))


def _write(fmt: str, directory: Path) -> Path:
    ds = datasets.Dataset.from_dict({"text": TEXTS, "extra": list(range(len(TEXTS)))})
    if fmt == "jsonl":
        return write_lines(directory / "train.jsonl", [{"text": t, "extra": i} for i, t in enumerate(TEXTS)])
    if fmt == "json array":
        path = directory / "train.json"
        path.write_text(json.dumps([{"text": t} for t in TEXTS]))
        return path
    if fmt == "jsonl shards":
        write_lines(directory / "a.jsonl", [{"text": t} for t in TEXTS[:2]])
        write_lines(directory / "b.jsonl", [{"text": t} for t in TEXTS[2:]])
        return directory
    if fmt == "parquet":
        ds.to_parquet(str(directory / "train.parquet"))
        return directory / "train.parquet"
    ds.save_to_disk(str(directory / "saved"))
    if fmt == "save_to_disk":
        return directory / "saved"
    assert fmt == "arrow"
    return next((directory / "saved").glob("*.arrow"))


@pytest.mark.parametrize("fmt", ["jsonl", "json array", "jsonl shards", "parquet", "arrow", "save_to_disk"])
def test_every_format_loads_the_same_documents(fmt, tmp_path, tok_dir, tok):
    ds = PackedDataset(config(_write(fmt, tmp_path), tok_dir))
    assert ds.skipped == 0
    assert documents(ds, tok) == [f"<bos>{t}<eos>" for t in TEXTS]


def test_loading_leaves_no_cache_next_to_the_data(tmp_path, tok_dir):
    path = _write("jsonl", tmp_path)
    PackedDataset(config(path, tok_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]


# -- bad rows ---------------------------------------------------------------------------------

MALFORMED = [
    {"text": "12+3=15"},
    {"other": "no text field"},  # row 1: missing
    {"text": 42},  # row 2: wrong type
    {"text": ""},  # row 3: empty
    '{"text": "rev:ab=ba"',  # row 4: truncated JSON
    {"text": "rev:ab=ba"},
]


def test_malformed_rows_are_skipped_and_counted(tmp_path, tok_dir, tok):
    path = write_lines(tmp_path / "train.jsonl", MALFORMED)
    ds = PackedDataset(config(path, tok_dir, bad_rows="skip"))
    assert ds.skipped == 4
    assert documents(ds, tok) == ["<bos>12+3=15<eos>", "<bos>rev:ab=ba<eos>"]
    reasons = "\n".join(ds.skip_reasons)
    for row, what in [(1, "'text' is missing"), (2, "'text' is not a string"), (3, "'text' is empty"),
                      (4, "not valid JSON")]:
        assert f"{path} row {row} (0-based): " in reasons and what in reasons


def test_wrongly_typed_rows_without_broken_json_are_skipped_too(tmp_path, tok_dir):
    path = write_lines(tmp_path / "train.jsonl", [r for r in MALFORMED if not isinstance(r, str)])
    ds = PackedDataset(config(path, tok_dir))
    assert ds.skipped == 3 and ds.num_documents == 2


def test_malformed_row_in_error_mode_names_file_row_field_and_fix(tmp_path, tok_dir):
    path = write_lines(tmp_path / "train.jsonl", MALFORMED)
    with pytest.raises(ValueError, match=rf"{path} row 1 \(0-based\): field 'text' is missing.*data\.bad_rows=skip"):
        PackedDataset(config(path, tok_dir, bad_rows="error"))


def test_null_values_in_parquet_are_bad_rows(tmp_path, tok_dir):
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_dict({"text": ["12+3=15", None, "7-2=5"]}).to_parquet(str(path))
    ds = PackedDataset(config(path, tok_dir))
    assert ds.skipped == 1 and ds.num_documents == 2


def test_a_field_absent_from_the_file_is_reported_per_row(tmp_path, tok_dir):
    path = write_lines(tmp_path / "train.jsonl", [{"prompt": "1+1=", "response": "2"}])
    with pytest.raises(ValueError, match="no usable rows .*1 malformed rows skipped.*'text' is missing"):
        PackedDataset(config(path, tok_dir))


def test_skip_keeps_only_the_first_few_reasons(tmp_path, tok_dir):
    path = write_lines(tmp_path / "train.jsonl", [{"text": ""}] * 20 + [{"text": "1+1=2"}])
    ds = PackedDataset(config(path, tok_dir))
    assert ds.skipped == 20 and len(ds.skip_reasons) == 5


# -- tokenization -----------------------------------------------------------------------------

def test_pretrain_trains_on_every_token_after_bos(tmp_path, tok_dir, tok):
    path = write_lines(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    ds = PackedDataset(config(path, tok_dir, seq_len=64))
    s = ds[0]
    trained = s["labels"][s["loss_mask"].bool()].tolist()
    expected = [i for t in TEXTS for i in tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]]
    assert trained == expected
    assert int(ds.loss_tokens.sum()) == len(expected)


def test_sft_trains_exactly_on_responses(tmp_path, tok_dir, tok):
    rows = [{"prompt": r["prompt"], "response": r["answer"]} for r in generate("arithmetic", 30, seed=1)]
    path = write_lines(tmp_path / "train.jsonl", rows)
    ds = PackedDataset(config(path, tok_dir, kind="sft", seq_len=48))
    trained, prompts_seen = [], []
    for i in range(len(ds)):
        s, start = ds[i], 0
        for n in s["doc_lens"]:
            tokens, labels, mask = (s[k][start:start + n] for k in ("tokens", "labels", "loss_mask"))
            start += n
            if tokens[0] != tok.bos_token_id:
                continue  # the pad segment
            trained.append(tok.decode(labels[mask.bool()].tolist()))
            prompts_seen.append(tok.decode(tokens[1:int(mask.argmax()) + 1].tolist()))
    assert trained == [r["response"] + "<eos>" for r in rows]
    assert prompts_seen == [r["prompt"] for r in rows]  # the masked part is exactly bos + prompt


def test_add_bos_and_eos_can_be_turned_off(tmp_path, tok_dir, tok):
    path = write_lines(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    ds = PackedDataset(config(path, tok_dir, add_bos=False, add_eos=False))
    assert documents(ds, tok) == TEXTS


def test_custom_field_names(tmp_path, tok_dir, tok):
    path = write_lines(tmp_path / "train.jsonl", [{"q": "1+1=", "a": "2"}])
    ds = PackedDataset(config(path, tok_dir, kind="sft", prompt_field="q", response_field="a"))
    assert documents(ds, tok) == ["<bos>1+1=2<eos>"]


def test_every_sample_is_seq_len_long(tmp_path, tok_dir):
    path = write_lines(tmp_path / "train.jsonl", [{"text": r["prompt"] + r["answer"]} for r in generate("sort", 50, 0)])
    for pack in (True, False):
        ds = PackedDataset(config(path, tok_dir, seq_len=16, pack=pack))
        assert all(ds[i]["tokens"].shape == (16,) and sum(ds[i]["doc_lens"]) == 16 for i in range(len(ds)))


def test_shuffled_packing_is_a_function_of_the_seed(tmp_path, tok_dir):
    path = write_lines(tmp_path / "train.jsonl", [{"text": r["prompt"] + r["answer"]} for r in generate("sort", 60, 0)])

    def tokens(**kw):
        ds = PackedDataset(config(path, tok_dir, shuffle=True, **kw))
        return torch.stack([ds[i]["tokens"] for i in range(len(ds))])

    assert torch.equal(tokens(seed=3), tokens(seed=3))
    assert not torch.equal(tokens(seed=3), tokens(seed=4))

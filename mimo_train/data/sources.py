"""Reading rows from files on disk with HF `datasets`, and checking each row's fields.

`data.path` is a .jsonl/.json/.parquet/.arrow file, a directory of such files (one format),
or a directory written by `datasets.save_to_disk`. Files are read one at a time so a bad row
can be named by its file and row index. Nothing is cached outside a temporary directory that
is gone once the rows are in memory, so runs and tests leave no trace in the user's home.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import datasets

# File suffix -> the HF `datasets` packaged builder that reads it.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
EXPECTED = ("a .jsonl/.json/.parquet/.arrow file, a directory of such files, "
            "or a directory written by datasets.save_to_disk")
MAX_REASONS = 5  # reasons kept for the log; the count covers every skipped row


class BadRows:
    """What to do with a malformed row: `skip` counts it (and keeps the first few reasons),
    `error` raises a ValueError that names the file, row, field and the fix."""

    def __init__(self, policy: str):
        self.policy = policy
        self.count = 0
        self.reasons: list[str] = []

    def report(self, source: str, row: int, problem: str) -> None:
        where = f"{source} row {row} (0-based)"
        if self.policy == "error":
            raise ValueError(f"{where}: {problem}; fix the row, or set data.bad_rows=skip to skip malformed rows")
        self.count += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(f"{where}: {problem}")


@dataclass
class Table:
    """One file's rows as columns of Python values; `unreadable` maps row index -> why a
    row could not be parsed at all (only for JSON lines that are not valid JSON)."""

    source: str
    num_rows: int
    columns: dict[str, list]
    unreadable: dict[int, str] = field(default_factory=dict)


def _saved_dataset(directory: Path) -> bool:
    return (directory / "state.json").exists() or (directory / "dataset_dict.json").exists()


def data_files(path: str | Path) -> list[Path]:
    """The files `path` stands for (a save_to_disk directory is returned as itself)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data.path={path} does not exist: expected {EXPECTED} "
                                "(make synthetic data with `python tools/make_data.py --out DIR`)")
    if path.is_file():
        if path.suffix not in BUILDERS:
            raise ValueError(f"data.path={path}: unsupported file type {path.suffix!r}; expected {EXPECTED}")
        return [path]
    if _saved_dataset(path):
        return [path]
    # Not recursive: a subdirectory (e.g. make_data's eval/) is never trained on by accident.
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in BUILDERS)
    if not files:
        raise FileNotFoundError(f"data.path={path} is a directory with no data files: expected {EXPECTED}")
    suffixes = {BUILDERS[p.suffix] for p in files}
    if len(suffixes) > 1:
        raise ValueError(f"data.path={path} mixes formats {sorted(suffixes)}; keep one format per directory")
    return files


def _columns(ds: datasets.Dataset, fields: list[str]) -> dict[str, list]:
    # One conversion per file (row-by-row access is ~100x slower); a field absent from the whole
    # file becomes a column of None, so each row reports it missing.
    present = ds.select_columns([f for f in fields if f in ds.column_names]).to_dict()
    return {f: present.get(f, [None] * len(ds)) for f in fields}


def _json_lines(path: Path, fields: list[str]) -> Table:
    """Line-by-line fallback for JSON lines that `datasets` refuses (a truncated or broken
    line fails the whole file there); blank lines are skipped, as `datasets` does."""
    columns: dict[str, list] = {f: [] for f in fields}
    unreadable: dict[int, str] = {}
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            row, unreadable[i] = {}, f"not valid JSON ({err.msg} at column {err.colno})"
        if not isinstance(row, dict):
            row, unreadable[i] = {}, f"not a JSON object (got {type(row).__name__})"
        for f in fields:
            columns[f].append(row.get(f))
    return Table(str(path), len(lines), columns, unreadable)


def read_table(path: Path, fields: list[str]) -> Table:
    """The `fields` of every row of one file (or save_to_disk directory)."""
    if path.is_dir():
        ds = datasets.load_from_disk(str(path), keep_in_memory=True)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"data.path={path} holds splits {list(ds)} and no 'train' split; "
                                 "point data.path at one split's directory")
            ds = ds["train"]
        return Table(str(path), len(ds), _columns(ds, fields))
    builder = BUILDERS[path.suffix]
    with tempfile.TemporaryDirectory(prefix="mimo-data-cache-") as cache, _quiet():
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                       keep_in_memory=True)
        # A broken JSON line surfaces as DatasetGenerationError, or as a bare ValueError when
        # the file also mixes value types; either way the per-line reader can say which row.
        except (datasets.exceptions.DatasetGenerationError, ValueError) as err:
            if builder == "json" and _starts_with_object(path):
                return _json_lines(path, fields)
            raise ValueError(f"{path}: could not be read as {builder} ({err.__cause__ or err})") from err
        return Table(str(path), len(ds), _columns(ds, fields))


@contextlib.contextmanager
def _quiet():
    """No "Generating train split" progress bar in the training log (restored afterwards)."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _starts_with_object(path: Path) -> bool:
    """JSON lines begin with '{'; a .json file holding one array cannot be read line by line."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return line.lstrip().startswith("{")
    return False


def load_rows(path: str | Path, fields: list[str], bad: BadRows) -> list[tuple[str, ...]]:
    """Rows whose every field in `fields` is a non-empty string, in file order, as tuples in
    the order of `fields`; other rows go to `bad` (skipped and counted, or an error)."""
    rows: list[tuple[str, ...]] = []
    for file in data_files(path):
        table = read_table(file, fields)
        for i in range(table.num_rows):
            if i in table.unreadable:
                bad.report(table.source, i, table.unreadable[i])
                continue
            values = tuple(table.columns[f][i] for f in fields)
            problem = next((_problem(f, v) for f, v in zip(fields, values) if _problem(f, v)), None)
            if problem:
                bad.report(table.source, i, problem)
            else:
                rows.append(values)
    return rows


def _problem(name: str, value) -> str | None:
    if value is None:
        return f"field {name!r} is missing (expected a non-empty string)"
    if not isinstance(value, str):
        return f"field {name!r} is not a string (got {type(value).__name__} {str(value)[:40]!r})"
    if not value:
        return f"field {name!r} is empty"
    return None

"""The documentation's commands work as written: every shell block a user would copy from
README.md and docs/*.md runs, in order, in a fresh directory, on tiny settings.

How (docs/training.md, "How the documented commands are tested", says the same for users):
- A page's blocks (```bash, ```sh, ```shell, ```console: its `$ ` lines) run one after the
  other with bash (`set -euo pipefail`) in one temporary directory per page, which holds links
  to the repository's code, recipes and configs and nothing else: data/, runs/, export/ are what
  the page's own commands make there.
- `python` and `torchrun` in those blocks are shell functions that go through
  tests/docs/doc_shell.py: the command runs as written, in a process of its own (forked from the
  suite's zygote, tests/training/zygote.py, where it is a script's: torch already imported), with the tiny
  settings of `doc_shell.SHRINK` appended (`mimo_train/run.py`: the `tiny` model, one step of 4
  samples; `tools/make_data.py`: 100 rows per domain; `tools/evaluate.py`: 3 prompts per domain;
  `tools/bench_rollout.py`: one short round; `tools/accept_law.py`: 3 prompts, one short sample
  each), replacing the same settings where a block gives them. torchrun gets `--standalone`.
- The full-size commands are checked too, without training: every `mimo_train/run.py` command
  as written (the `small` model, the recipe's batch) must pass the config checks and the
  parallel-layout check for its number of ranks.
- A page that continues from the README's commands says so with `<!-- docs-test: after
  README.md -->`: it runs in a copy of the README's directory after the README's blocks.
- A block that must not run here is marked by an HTML comment on the line before its fence,
  `<!-- docs-test: no-run: <why> -->` (a GPU, several nodes, `make test` itself); the reason is
  required and the number of such blocks is held small (MAX_SKIPPED). A block that starts vLLM
  servers is marked `<!-- docs-test: vllm -->`: its page's test then carries the `vllm` marker,
  so `make test VLLM=0` leaves it out.

Budget: about 2.5 minutes on 2 cores beside another test file (each command is a fork and one
tiny step; the README and its DeepSpeed page's vLLM server take most of it; two pages run at a time).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.docs import doc_shell
from tests.training.runs import ZYGOTE, run_env

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"bash", "sh", "shell", "console"}
MAX_SKIPPED = 8
# What a page's directory links to: the repository minus what commands write and VCS state.
NOT_LINKED = {".git", "runs", "data", "export", "ckpt", "outputs", "wandb", ".pytest_cache", "__pycache__"}

FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)(.*)$")
DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")

PRELUDE = """set -euo pipefail
python() { "$DOCS_PY" "$DOCS_SHELL" python "$@"; }
torchrun() { "$DOCS_PY" "$DOCS_SHELL" torchrun "$@"; }
"""


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: str | None  # the stated reason, when the block must not run
    vllm: bool


def _commands(lang: str, body: list[str]) -> str:
    if lang != "console":
        return "\n".join(body)
    return "\n".join(line[2:] for line in body if line.startswith("$ "))


def shell_blocks(page: Path) -> list[Block]:
    """The shell blocks of a markdown page, with the docs-test directive just above each."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence[0] * len(fence))), len(lines))
        if lang in SHELLS:
            above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            d = DIRECTIVE.fullmatch(above.strip())
            directive = d.group(1) if d else ""
            skip = directive.split(":", 1)[1].strip() if directive.startswith("no-run") else None
            blocks.append(Block(page.name if page.parent == ROOT else f"docs/{page.name}", i + 1, lang,
                                _commands(lang, lines[i + 1:end]), skip, directive == "vllm"))
        i = end + 1
    return blocks


def after_readme(page: Path) -> bool:
    """The page says, on a line of its own, that it continues from the README's commands."""
    return any(line.strip() == "<!-- docs-test: after README.md -->" for line in page.read_text().splitlines())


def _name(page: Path) -> str:
    return "README.md" if page.parent == ROOT else f"docs/{page.name}"


def _workdir(path: Path) -> Path:
    path.mkdir(parents=True)
    for entry in ROOT.iterdir():
        if entry.name not in NOT_LINKED:
            (path / entry.name).symlink_to(entry)
    return path


def _env(log: Path) -> dict:
    env = {**run_env(), "DOCS_PY": sys.executable, "DOCS_SHELL": str(Path(doc_shell.__file__)), "DOCS_TEST_LOG": str(log),
           "DOCS_ZYGOTE": ZYGOTE.path()}
    return env


@dataclass
class PageRun:
    page: str
    workdir: Path
    failure: str | None  # the failing block and its output


@dataclass
class DocsRuns:
    pages: dict[str, PageRun]
    log: Path  # every python / torchrun command as written, one JSON line each (doc_shell.py)


def run_page(page: Path, workdir: Path, log: Path) -> PageRun:
    for block in shell_blocks(page):
        if block.skip is not None:
            continue
        proc = subprocess.run(["bash", "-c", PRELUDE + block.text], cwd=workdir, env=_env(log), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600, check=False)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-60:])
            return PageRun(_name(page), workdir, f"{block.page}:{block.line} exit {proc.returncode}\n"
                                                   f"{block.text}\n--- output (last lines) ---\n{tail}")
    return PageRun(_name(page), workdir, None)


def _vllm_page(page: Path) -> bool:
    return any(b.vllm and b.skip is None for b in shell_blocks(page))


@pytest.fixture(scope="session")
def docs_runs(tmp_path_factory) -> DocsRuns:
    """Every page without vLLM blocks, run once: the README first (pages that continue from it
    start from a copy of its directory), the others beside it, two at a time."""
    base = tmp_path_factory.mktemp("docs")
    log = base / "commands.jsonl"
    readme = ROOT / "README.md"
    pages = [p for p in PAGES if not _vllm_page(p)]
    alone = [p for p in pages if p != readme and not after_readme(p)]
    later = [p for p in pages if p != readme and after_readme(p)]
    runs: dict[str, PageRun] = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(run_page, readme, _workdir(base / "README"), log)
        others = [pool.submit(run_page, p, _workdir(base / p.stem), log) for p in alone]
        runs["README.md"] = first.result()
        done = runs["README.md"]
        follow = []
        for p in later:
            if done.failure:
                runs[_name(p)] = PageRun(_name(p), done.workdir, "not run: the README's commands failed")
                continue
            work = base / p.stem
            shutil.copytree(done.workdir, work, symlinks=True)
            follow.append(pool.submit(run_page, p, work, log))
        for f in [*others, *follow]:
            r = f.result()
            runs[r.page] = r
    return DocsRuns(runs, log)


def _page_params():
    return [pytest.param(p, id=_name(p), marks=[pytest.mark.vllm] if _vllm_page(p) else [])
            for p in PAGES if any(b.skip is None for b in shell_blocks(p))]


@pytest.mark.parametrize("page", _page_params())
def test_the_pages_commands_run_as_written(page, docs_runs, tmp_path):
    if _vllm_page(page):  # run here, not in docs_runs, so that `-m "not vllm"` leaves it out
        if after_readme(page):
            readme = docs_runs.pages["README.md"]
            assert readme.failure is None, "the README's commands failed"
            work = tmp_path / "page"
            shutil.copytree(readme.workdir, work, symlinks=True)
        else:
            work = _workdir(tmp_path / "page")
        result = run_page(page, work, tmp_path / "commands.jsonl")
    else:
        result = docs_runs.pages[_name(page)]
    assert result.failure is None, result.failure


def test_the_full_size_run_commands_pass_the_config_and_layout_checks(docs_runs):
    """Each run.py command as written (not shrunk): its config composes and validates, and its
    parallel layout is possible for its number of ranks, as run.py checks before any work."""
    from mimo_train.parallel.layout import check_layout
    from mimo_train.training.config import load_config

    entries = [json.loads(line) for line in docs_runs.log.read_text().splitlines()]
    runs = [e for e in entries if e["script"] == "mimo_train/run.py"]
    assert len(runs) >= 5, "the README's sequence alone has more run.py commands than this"
    problems = []
    here = os.getcwd()
    for e in runs:
        try:
            os.chdir(e["cwd"])
            config = load_config(e["args"])
            p = config.parallel
            check_layout(config.model, e["nproc"], p.tp, p.pp, p.ep, p.vpp, config.train.global_batch,
                         config.train.micro_batch)
        except ValueError as err:
            problems.append(f"{e['launcher']} ({e['nproc']} ranks) run.py {' '.join(e['args'])}: {err}")
        finally:
            os.chdir(here)
    assert not problems, "\n".join(problems)


def test_blocks_that_do_not_run_are_few_and_say_why():
    blocks = [b for p in PAGES for b in shell_blocks(p)]
    skipped = [b for b in blocks if b.skip is not None]
    assert all(len(b.skip.split()) >= 3 for b in skipped), [f"{b.page}:{b.line}" for b in skipped if len(b.skip.split()) < 3]
    assert len(skipped) <= MAX_SKIPPED, [f"{b.page}:{b.line}: {b.skip}" for b in skipped]
    assert len(blocks) - len(skipped) >= 2 * len(skipped)


def test_the_shell_blocks_are_found():
    """The parser sees the README's blocks, a no-run directive and a console block's commands."""
    readme = shell_blocks(ROOT / "README.md")
    assert any("make demo" in b.text and b.skip for b in readme)
    assert any("mimo_train/run.py recipe=mopd" in b.text and b.skip is None for b in readme)
    assert _commands("console", ["$ ls", "a  b", "$ echo x"]) == "ls\necho x"


def test_shrinking_replaces_the_documented_values_and_keeps_the_rest():
    run = doc_shell.shrink("mimo_train/run.py", ["recipe=sft", "model=small", "train.steps=500",
                                                 "checkpoint.load=runs/pretrain/checkpoints"])
    assert run[:2] == ["recipe=sft", "checkpoint.load=runs/pretrain/checkpoints"]
    assert run[2:] == doc_shell.RUN_OVERRIDES and "model=small" not in run
    tool = doc_shell.shrink("tools/make_data.py", ["--kind", "sft", "--n", "500", "--out", "d"])
    assert tool == ["--kind", "sft", "--out", "d", "--n", "100", "--n-eval", "10"]
    cmd, entry = doc_shell.command("torchrun", ["--nproc-per-node", "2", "mimo_train/run.py", "parallel.pp=2"])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    assert entry == {"launcher": "torchrun", "script": "mimo_train/run.py", "args": ["parallel.pp=2"], "nproc": 2}


# Links in the pages: a relative link names a file or directory of the repository.
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target, _ in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{_name(page)} -> {target}")
    assert not broken, broken


def test_the_docs_carry_the_model_facts_themselves():
    """Nothing in the repository points at a file outside it for the model facts (the shared
    architecture notes the project started from): docs/architecture.md holds them."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files = [ROOT / f for f in tracked if f.endswith((".py", ".md", ".yaml", ".toml")) and (ROOT / f).exists()]
    assert len(files) > 100
    this = Path(__file__).resolve()
    citing = [str(p.relative_to(ROOT)) for p in files if p.resolve() != this and "ARCHITECTURE.md" in p.read_text()]
    assert not citing, citing


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0].startswith("# "), "the title comes first"
    assert len(lines) <= 200
    first_screen = "\n".join(lines[:40])
    assert "make demo" in first_screen and "make test" in first_screen


def test_the_readmes_demo_table_is_the_recorded_runs_own():
    """The README's table is what the demo printed for the run it cites (its artifact link,
    docs/results/demo-<commit>/summary.json): format_table of that summary, line for line."""
    from mimo_train.rl.evaluate import format_table

    readme = (ROOT / "README.md").read_text()
    cited = re.findall(r"docs/results/demo-[0-9a-f]+/summary\.json", readme)
    assert len(set(cited)) == 1, f"the README should cite one demo run's summary.json, it cites {sorted(set(cited))}"
    summary = json.loads((ROOT / cited[0]).read_text())
    assert summary["environment"]["commit"] in cited[0]
    assert format_table(summary["results"]).strip() in readme

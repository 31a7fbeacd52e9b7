"""`python` and `torchrun` as the documentation's shell blocks meet them in the docs test.

tests/docs/test_docs_commands.py defines `python` and `torchrun` as shell functions that call

    doc_shell.py python ARGS...      doc_shell.py torchrun ARGS...

which runs the command as written, in a process of its own, with tiny settings appended for the
scripts that would otherwise train for minutes (SHRINK below: later values win in Hydra and in
argparse, and an option the documentation already gives is replaced, not repeated). So a block
is tested as a user copies it, only smaller. Every command is also logged (DOCS_TEST_LOG, one
JSON line each, as written) so the test can check the full-size run.py configs too.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

# Hydra overrides appended to every `mimo_train/run.py` command: the tiny model, one step of 4
# samples (RL: 2 prompts x 2 samples of at most 4 new tokens), no progress bars or plots, and
# the run's vLLM servers on the one thread its own processes get (OMP_NUM_THREADS=1 here).
RUN_OVERRIDES = ["model=tiny", "train.steps=1", "optim.warmup_steps=0", "train.global_batch=4",
                 "train.micro_batch=2", "data.seq_len=32", "rl.prompts_per_step=2", "rl.group_size=2",
                 "rl.max_new_tokens=4", "logging.progress=false", "logging.plot=false", "rollout.vllm.cpu_threads=1"]

# Options appended to the tools' commands (the option and its value; None: a flag).
TOOL_OPTIONS = {
    "tools/make_data.py": [("--n", "100"), ("--n-eval", "10")],
    "tools/evaluate.py": [("--limit", "3"), ("--max-new-tokens", "4"), ("--no-progress", None)],
    "tools/export.py": [("--no-progress", None)],
    "tools/bench_rollout.py": [("--batches", "1"), ("--depths", "0,1"), ("--rounds", "1"), ("--new-tokens", "4"),
                               ("--batch1-prompts", "1")],
    "tools/accept_law.py": [("--limit", "3"), ("--samples", "1"), ("--max-new-tokens", "8"), ("--no-plot", None)],
}

SHRINK = {"mimo_train/run.py": RUN_OVERRIDES, **TOOL_OPTIONS}


def _key(arg: str) -> str:
    return arg.split("=", 1)[0]


def shrink_run(args: list[str]) -> list[str]:
    """run.py's arguments with RUN_OVERRIDES in place of any the command sets itself."""
    ours = {_key(a) for a in RUN_OVERRIDES}
    return [a for a in args if _key(a) not in ours] + RUN_OVERRIDES


def shrink_tool(args: list[str], options: list[tuple[str, str | None]]) -> list[str]:
    """A tool's arguments with `options` in place of the same options given by the command."""
    ours = {name for name, _ in options}
    kept, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ours:
            takes_value = dict(options)[name] is not None
            skip = takes_value and "=" not in arg and i + 1 < len(args)
            continue
        kept.append(arg)
    for name, value in options:
        kept += [name] if value is None else [name, value]
    return kept


def shrink(script: str, args: list[str]) -> list[str]:
    rel = os.path.normpath(script)
    if rel == "mimo_train/run.py":
        return shrink_run(args)
    if rel in TOOL_OPTIONS:
        return shrink_tool(args, TOOL_OPTIONS[rel])
    return list(args)


def _script_index(args: list[str]) -> int | None:
    """Position of the script in a torchrun command line (the first *.py argument)."""
    return next((i for i, a in enumerate(args) if a.endswith(".py")), None)


NPROC_FLAGS = ("--nproc-per-node", "--nproc_per_node")  # torchrun's spellings of the rank count


def nproc_of(launcher_args: list[str]) -> int:
    for i, a in enumerate(launcher_args):
        for name in NPROC_FLAGS:
            if a == name:
                return int(launcher_args[i + 1])
            if a.startswith(name + "="):
                return int(a.split("=", 1)[1])
    return 1


def command(kind: str, args: list[str]) -> tuple[list[str], dict]:
    """The command line to run, and the log entry of the command as written."""
    python = sys.executable
    if kind == "python":
        if not args or args[0].startswith("-"):  # python -m / -c: as written
            return [python, *args], {"launcher": "python", "script": None, "args": args, "nproc": 1}
        script, rest = args[0], args[1:]
        return [python, script, *shrink(script, rest)], {"launcher": "python", "script": os.path.normpath(script),
                                                         "args": rest, "nproc": 1}
    if kind == "torchrun":
        at = _script_index(args)
        if at is None:
            raise SystemExit(f"doc_shell: no script in torchrun {args}")
        launcher, script, rest = args[:at], args[at], args[at + 1:]
        # --standalone (one node, a free rendezvous port): two pages' torchrun commands may run at once.
        single = [] if any(a.startswith(("--nnodes", "--rdzv", "--master")) for a in launcher) else ["--standalone"]
        return ([python, "-m", "torch.distributed.run", *single, *launcher, script, *shrink(script, rest)],
                {"launcher": "torchrun", "script": os.path.normpath(script), "args": rest, "nproc": nproc_of(launcher)})
    raise SystemExit(f"doc_shell: unknown launcher {kind!r}")


def forkable(kind: str, args: list[str]) -> bool:
    """Whether the zygote can start this command: a script (not `python -m`/`-c`), and for
    torchrun one node with nothing but --nproc-per-node given to the launcher."""
    if kind == "python":
        return bool(args) and not args[0].startswith("-")
    at = _script_index(args)
    if at is None:
        return False
    i = 0
    while i < at:
        if args[i] in NPROC_FLAGS:
            i += 2
        elif args[i].split("=", 1)[0] in NPROC_FLAGS:
            i += 1
        else:
            return False
    return True


def main(argv: list[str]) -> None:
    argv_run, entry = command(argv[0], argv[1:])
    log = os.environ.get("DOCS_TEST_LOG")
    if log:
        with Path(log).open("a") as f:
            f.write(json.dumps({**entry, "cwd": os.getcwd(), "start": time.time()}) + "\n")
    path = os.environ.get("DOCS_ZYGOTE")
    if path and forkable(argv[0], argv[1:]):
        # The same script and arguments in a process forked from the suite's zygote, which has
        # torch and megatron-core imported already (tests/training/zygote.py says what a child
        # gets); this process waits for it and exits with its status, as the shell expects.
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from tests.training import zygote

        script = entry["script"]
        code = zygote.run(path, script, shrink(script, entry["args"]), env=dict(os.environ), cwd=os.getcwd(),
                          nproc=entry["nproc"])
        sys.exit(code if code >= 0 else 128 - code)
    os.execv(argv_run[0], argv_run)


if __name__ == "__main__":
    main(sys.argv[1:])

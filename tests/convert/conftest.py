"""One training checkpoint made by a real TP=2 x PP=2 run (4 gloo ranks, one step), and one
fp32 export of it made through the command line with --verify; every test here shares them.

The tiny model gets 2 global / 4 SWA kv heads: TP=2 must divide the kv heads, and
transformers can only express SWA layers with twice the global kv heads.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from mimo_train.model.config import ModelConfig
from tests.training.runs import ROOT, tool, train

MODEL_OVERRIDES = {"num_key_value_heads": 2, "swa_num_key_value_heads": 4}
SHARD_SIZE = "200KB"  # the tiny model is ~2.3 MB in fp32: several shards


def run_config() -> ModelConfig:
    """The model config a run with `model=tiny` and MODEL_OVERRIDES builds."""
    return ModelConfig.preset("tiny", **MODEL_OVERRIDES)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("convert_data")
    tool("make_data").make(out, kind="pretrain", n=40, n_eval=2, seed=0)
    return out


@pytest.fixture(scope="session")
def trained(data_dir, tmp_path_factory) -> Path:
    """The checkpoint dir (with `latest`) of one optimizer step under TP=2 x PP=2."""
    run_dir = tmp_path_factory.mktemp("convert_run")
    args = ["recipe=pretrain", "model=tiny", *[f"model.{k}={v}" for k, v in MODEL_OVERRIDES.items()],
            "parallel.tp=2", "parallel.pp=2", "train.steps=1", "optim.warmup_steps=0", "train.global_batch=4",
            "train.micro_batch=2", "data.seq_len=32", f"data.path={data_dir}/train.jsonl",
            f"data.tokenizer={data_dir}/tokenizer", f"logging.run_dir={run_dir}", "logging.progress=false",
            "logging.plot=false"]
    train(args, nproc=4)
    return run_dir / "checkpoints"


@pytest.fixture(scope="session")
def exported(trained, data_dir, tmp_path_factory):
    """`tools/export.py --dtype fp32 --verify` of the trained checkpoint: (directory, stdout)."""
    out = tmp_path_factory.mktemp("convert_export") / "serving"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        tool("export").main(["--ckpt", str(trained), "--out", str(out), "--dtype", "fp32", "--shard-size", SHARD_SIZE,
                             "--tokenizer", str(data_dir / "tokenizer"), "--verify", "--no-progress"])
    return out, printed.getvalue()

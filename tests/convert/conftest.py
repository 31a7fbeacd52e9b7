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
from tests.shared_build import build_once
from tests.training.runs import ROOT, tool, train

MODEL_OVERRIDES = {"num_key_value_heads": 2, "swa_num_key_value_heads": 4}
SHARD_SIZE = "200KB"  # the tiny model is ~2.3 MB in fp32: several shards


def run_config() -> ModelConfig:
    """The model config a run with `model=tiny` and MODEL_OVERRIDES builds."""
    return ModelConfig.preset("tiny", **MODEL_OVERRIDES)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return build_once(tmp_path_factory, "convert_data",
                      lambda d: tool("make_data").make(d, kind="pretrain", n=40, n_eval=2, seed=0))


@pytest.fixture(scope="session")
def trained(data_dir, tmp_path_factory) -> Path:
    """The checkpoint dir (with `latest`) of one optimizer step under TP=2 x PP=2 (built once per
    pytest run, shared by the xdist workers: read-only)."""
    return build_once(tmp_path_factory, "convert_run", lambda d: _train_tp2_pp2(data_dir, d)) / "checkpoints"


def _train_tp2_pp2(data_dir: Path, run_dir: Path) -> None:
    args = ["recipe=pretrain", "model=tiny", *[f"model.{k}={v}" for k, v in MODEL_OVERRIDES.items()],
            "parallel.tp=2", "parallel.pp=2", "train.steps=1", "optim.warmup_steps=0", "train.global_batch=4",
            "train.micro_batch=2", "data.seq_len=32", f"data.path={data_dir}/train.jsonl",
            f"data.tokenizer={data_dir}/tokenizer", f"logging.run_dir={run_dir}", "logging.progress=false",
            "logging.plot=false"]
    train(args, nproc=4)


@pytest.fixture(scope="session")
def exported(trained, data_dir, tmp_path_factory):
    """`tools/export.py --dtype fp32 --verify` of the trained checkpoint: (directory, stdout)."""
    out = tmp_path_factory.mktemp("convert_export") / "serving"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        tool("export").main(["--ckpt", str(trained), "--out", str(out), "--dtype", "fp32", "--shard-size", SHARD_SIZE,
                             "--tokenizer", str(data_dir / "tokenizer"), "--verify", "--no-progress"])
    return out, printed.getvalue()


# ---- FP8 twins (tests/convert/test_fp8_serving_load.py): one process, no torchrun ------------
FP8_BLOCK = (32, 48)  # several blocks per matrix of the tiny model, with edge blocks on both axes


@pytest.fixture(scope="session")
def one_rank_checkpoint(tmp_path_factory, megatron_single) -> Path:
    """A weights-only training checkpoint of a randomly initialised tiny model, saved in this
    process with the training code's own `checkpoint.save` (as a one-rank run would). The
    matrices are scaled to std ~0.1 so that logits and greedy choices depend on the weights
    (at megatron's init std 0.02 every logit is near 0)."""
    import dataclasses

    import torch

    from mimo_train.model.gpt import build_model
    from mimo_train.model.spec import MegatronOptions
    from mimo_train.parallel.setup import init_distributed
    from mimo_train.training import checkpoint

    cfg = ModelConfig.preset("tiny", num_nextn_predict_layers=1)
    init_distributed()
    torch.manual_seed(11)
    model = build_model(cfg, MegatronOptions())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.mul_(2.0)
    out = tmp_path_factory.mktemp("fp8_twins") / "checkpoints"
    checkpoint.save(out, 0, [model], None, {"model": dataclasses.asdict(cfg)}, keep_last=1)
    return out


@pytest.fixture(scope="session")
def fp8_twins(one_rank_checkpoint) -> dict[str, Path]:
    """The same checkpoint exported twice by our exporter: `fp32` (--dtype fp32) and `fp8`
    (--dtype fp32 --fp8, block FP8_BLOCK)."""
    from mimo_train.convert import export_checkpoint

    root = one_rank_checkpoint.parent
    quiet = dict(progress=False, log=lambda *a: None)
    export_checkpoint(one_rank_checkpoint, root / "fp32", dtype="fp32", **quiet)
    export_checkpoint(one_rank_checkpoint, root / "fp8", dtype="fp32", quantize_fp8=True, fp8_block=FP8_BLOCK, **quiet)
    return {"fp32": root / "fp32", "fp8": root / "fp8"}

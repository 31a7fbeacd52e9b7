"""Our attention under tensor parallelism (heads, kv heads and sinks split over 2 gloo ranks)
gives the logits of one process, for the main model and every MTP depth, and its sinks are
checkpointed as TP shards of one tensor."""

from pathlib import Path

import pytest
import torch

from tests.model import tp_worker
from tests.training.runs import launch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("feed", ["chained", "target_hidden"])
def test_tp2_logits_equal_one_process(tmp_path, megatron_single, feed):
    """With target_hidden the MTP layers read the decoder's pre-norm hidden state, sequence-
    parallel under TP like the normed one."""
    code, out = launch([str(tmp_path / "tp2.pt"), "2", feed], nproc=2, script=ROOT / "tests" / "model" / "tp_worker.py")
    assert code == 0, out[-3000:]
    saved = torch.load(tmp_path / "tp2.pt")
    parallel = saved["logits"]
    single = tp_worker.logits(tp=1, feed=feed)
    assert len(parallel) == len(single) == 4
    for depth, (a, b) in enumerate(zip(parallel, single)):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5, f"depth {depth}"
    # Each rank holds half the heads' sinks; checkpoints store them as one tensor of all heads.
    heads = 4
    assert len(saved["sinks"]) == 4 + 3  # 4 SWA layers + 3 MTP layers
    assert set(saved["sinks"].values()) == {((heads // 2,), (heads,))}

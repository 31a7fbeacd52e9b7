"""A non-finite loss or gradient skips that update and is logged; too many stop the run
without saving, so the last good checkpoint stays `latest`."""

import math

import torch

from mimo_train.run import main
from mimo_train.training.trainer import Trainer
from tests.training.runs import metrics, tiny_args


def test_nan_steps_are_skipped_then_the_run_stops(capsys, monkeypatch, synthetic_data, tmp_path, megatron_single):
    original = Trainer._loss

    def poisoned(self, counts, num_microbatches, out):
        loss, sums = original(self, counts, num_microbatches, out)
        if self.step + 1 in (3, 4):  # the steps being computed
            return loss * float("nan"), sums * float("nan")
        return loss, sums

    monkeypatch.setattr(Trainer, "_loss", poisoned)
    code = main(tiny_args(synthetic_data, tmp_path, "checkpoint.every=1", "train.max_skipped_steps=1"))
    assert code == 2
    assert "max_skipped_steps" in capsys.readouterr().err
    rows = metrics(tmp_path)
    assert [rows[s]["skipped"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert math.isnan(rows[3]["loss/total"]) and rows[4]["skipped_total"] == 2
    assert rows[3]["lr"] == rows[4]["lr"]  # the scheduler does not advance on a skipped step
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text() == "iter_0000003"  # step 4 failed: nothing saved after it
    assert 5 not in rows

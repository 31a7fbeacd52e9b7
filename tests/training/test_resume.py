"""A crash costs only the steps since the last checkpoint: kill -9 at any moment, resume, and
the losses equal those of a run that never stopped, bit for bit."""

import os

from tests.training.runs import LOSSES, ROOT, kill_once_logged, launch, metrics, tiny_args, train


def test_kill_9_mid_run_then_resume_is_bit_exact(synthetic_data, initial_weights, reference_run, tmp_path):
    args = tiny_args(synthetic_data, tmp_path, "checkpoint.every=1", init=initial_weights)
    proc = launch(args, wait=False)
    kill_once_logged(proc, tmp_path, step=4)
    assert (tmp_path / "checkpoints" / "latest").exists()
    out = train(args)
    assert "resumed from" in out
    ours, ref = metrics(tmp_path), metrics(reference_run)
    assert sorted(ours) == [1, 2, 3, 4, 5, 6]
    for step in ours:
        for key in LOSSES:
            assert ours[step][key] == ref[step][key], (step, key)


def test_kill_during_a_save_leaves_the_previous_checkpoint(synthetic_data, initial_weights, reference_run, tmp_path):
    args = tiny_args(synthetic_data, tmp_path, "checkpoint.every=1", init=initial_weights)
    os.environ["DIE_AT_SAVE"] = "3"  # dies inside the step-3 save
    try:
        code, out = launch(args, script=ROOT / "tests" / "training" / "die_during_save.py")
    finally:
        del os.environ["DIE_AT_SAVE"]
    assert code != 0
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text() == "iter_0000002"
    assert (ckpts / "iter_0000003.tmp").exists() and not (ckpts / "iter_0000003").exists()
    out = train(args)
    assert "resumed from" in out and "iter_0000002" in out
    assert not (ckpts / "iter_0000003.tmp").exists()
    ours, ref = metrics(tmp_path), metrics(reference_run)
    for step in (3, 4, 5, 6):
        for key in LOSSES:
            assert ours[step][key] == ref[step][key], (step, key)
    assert (ckpts / "latest").read_text() == "iter_0000006"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000005", "iter_0000006"]  # keep_last=2

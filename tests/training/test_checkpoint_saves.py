"""A save never silently skips and is durable: `latest` is the commit point. A step that
`latest` already names is this run's own state and is not rewritten; an iter_N that `latest`
does not name (a crash between the rename and `latest`) is replaced and `latest` advanced; the
renames and `latest` are flushed with a directory fsync; a run that does not resume refuses a
checkpoint dir holding another run."""

import pytest
import torch

from mimo_train.model.config import ModelConfig
from mimo_train.model.gpt import build_model
from mimo_train.training import checkpoint


@pytest.fixture
def model(megatron_single):
    torch.manual_seed(0)
    return build_model(ModelConfig.preset("tiny", num_key_value_heads=2))


def save(path, step, model):
    return checkpoint.save(path, step, [model], None, {"note": f"step {step}"}, keep_last=5)


def weights_in(path, like):
    fresh = build_model(ModelConfig.preset("tiny", num_key_value_heads=2))
    checkpoint.load(path, [fresh], None, load_optimizer=False, load_rng=False)
    return {k: v for k, v in fresh.state_dict().items() if k in like and isinstance(v, torch.Tensor)}


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)


def test_uncommitted_step_is_replaced_and_latest_advanced(model, tmp_path):
    save(tmp_path, 1, model)
    save(tmp_path, 2, model)
    (tmp_path / "latest").write_text("iter_0000001")  # as after a crash between the rename and `latest`
    perturb(model)
    final = save(tmp_path, 2, model)
    assert (tmp_path / "latest").read_text() == "iter_0000002"
    expected = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    got = weights_in(final, expected)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000002", "latest"]


def test_committed_step_is_not_rewritten(model, tmp_path):
    final = save(tmp_path, 3, model)
    before = (final / checkpoint.STATE_FILE).stat().st_mtime_ns
    assert save(tmp_path, 3, model) == final  # e.g. the periodic save, then the final one
    assert (final / checkpoint.STATE_FILE).stat().st_mtime_ns == before
    assert (tmp_path / "latest").read_text() == "iter_0000003"


def test_renames_and_latest_are_flushed(model, tmp_path, monkeypatch):
    """Each directory fsync is recorded with what the directory then holds: one after the
    rename (iter_N in place, no .tmp) and one after `latest` names iter_N."""
    real, seen = checkpoint._fsync_dir, []

    def record(path):
        real(path)
        if path == tmp_path:
            latest = tmp_path / "latest"
            seen.append((sorted(p.name for p in path.iterdir()), latest.read_text() if latest.exists() else None))

    monkeypatch.setattr(checkpoint, "_fsync_dir", record)
    save(tmp_path, 4, model)
    assert (["iter_0000004"], None) in seen
    assert seen[-1] == (["iter_0000004", "latest"], "iter_0000004")


def test_pruning_keeps_the_newest_steps_not_names(model, tmp_path):
    for step in (8, 9, 10):
        checkpoint.save(tmp_path, step, [model], None, {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000009", "iter_0000010"]

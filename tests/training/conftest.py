import pytest

from tests.shared_build import build_once
from tests.training.runs import make_data, tiny_args, train_here

# Built once per pytest run and shared by the xdist workers (tests/shared_build.py): read-only.


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    return build_once(tmp_path_factory, "training_data",
                      lambda d: make_data(d, kind="pretrain", n=200, n_eval=10, seed=0))


@pytest.fixture(scope="session")
def initial_weights(synthetic_data, tmp_path_factory, megatron_single):
    """The tiny model's initial weights, saved before any step. Runs to be compared start from
    them: megatron initialises each rank's own layers/experts from one RNG stream, so a fresh
    init depends on the layout (TP alone splits full tensors and would not need this)."""
    run_dir = build_once(tmp_path_factory, "training_init",
                         lambda d: train_here(tiny_args(synthetic_data, d, "train.stop_at=0")))
    return run_dir / "checkpoints"


@pytest.fixture(scope="session")
def reference_run(synthetic_data, initial_weights, tmp_path_factory, megatron_single):
    """One process, 6 steps, checkpoint every step: the baseline every other run is held to."""
    return build_once(tmp_path_factory, "training_reference",
                      lambda d: train_here(tiny_args(synthetic_data, d, "checkpoint.every=1", "checkpoint.keep_last=10",
                                                     "logging.plot=true", init=initial_weights)))

import pytest

from tests.training.runs import tiny_args, train


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    import importlib.util

    from tests.training.runs import ROOT

    spec = importlib.util.spec_from_file_location("make_data", ROOT / "tools" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("data")
    module.make(out, kind="pretrain", n=200, n_eval=10, seed=0)
    return out


@pytest.fixture(scope="session")
def reference_run(synthetic_data, tmp_path_factory):
    """One process, 6 steps, checkpoint every step: the baseline every other run is held to."""
    run_dir = tmp_path_factory.mktemp("reference")
    train(tiny_args(synthetic_data, run_dir, "checkpoint.every=1", "checkpoint.keep_last=10", "logging.plot=true"))
    return run_dir

import pytest

from mimo_train.run import main
from tests.rl.rl_runs import DOMAINS, init_args
from tests.training.runs import make_data, train


@pytest.fixture(scope="session")
def rl_data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("rl_data"), kind="sft", domains=list(DOMAINS), n=100, n_eval=10, seed=0)


@pytest.fixture(scope="session")
def student_init(rl_data, tmp_path_factory, megatron_single):
    run_dir = tmp_path_factory.mktemp("student")
    assert main(init_args(rl_data, run_dir, seed=1)) == 0  # in this process: no start-up cost
    return run_dir / "checkpoints"


@pytest.fixture(scope="session")
def teacher_init(rl_data, tmp_path_factory, megatron_single):
    """A different random model: its log-probs differ from the student's, so the distillation
    advantage is not zero."""
    run_dir = tmp_path_factory.mktemp("teacher")
    assert main(init_args(rl_data, run_dir, seed=2)) == 0
    return run_dir / "checkpoints"


@pytest.fixture(scope="session")
def mopd_reference(rl_data, student_init, teacher_init, tmp_path_factory):
    """One process, 4 MOPD steps, a checkpoint every 2: the run the others are held to."""
    from tests.rl.rl_runs import mopd_args

    run_dir = tmp_path_factory.mktemp("mopd_ref")
    train(mopd_args(rl_data, run_dir, student_init, teacher_init, "checkpoint.every=2", "checkpoint.keep_last=5",
                    steps=4))
    return run_dir


@pytest.fixture(scope="session")
def student32(rl_data, tmp_path_factory, megatron_single):
    """The head-32 tiny model (vLLM's CPU attention size): a student for the vLLM runs."""
    from tests.rollout.vllm_utils import TINY32_ARGS

    run_dir = tmp_path_factory.mktemp("student32")
    assert main(init_args(rl_data, run_dir, seed=1, model=tuple(TINY32_ARGS))) == 0
    return run_dir / "checkpoints"


@pytest.fixture(scope="session")
def teacher32(rl_data, tmp_path_factory, megatron_single):
    from tests.rollout.vllm_utils import TINY32_ARGS

    run_dir = tmp_path_factory.mktemp("teacher32")
    assert main(init_args(rl_data, run_dir, seed=2, model=tuple(TINY32_ARGS))) == 0
    return run_dir / "checkpoints"


@pytest.fixture(scope="module")
def vllm_server(rl_data, tmp_path_factory):
    """One vLLM server for the runs that are given a URL (as a cluster launcher's would be);
    module-scoped: an idle vLLM CPU server still takes CPU time from the tests after it."""
    from tests.rollout.vllm_utils import start_server, tiny32

    server = start_server(tmp_path_factory.mktemp("vllm"), tiny32(), rl_data / "tokenizer")
    yield server.url
    server.stop()

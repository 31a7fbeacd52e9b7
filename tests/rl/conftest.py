import pytest

from tests.rl.rl_runs import DOMAINS, init_args
from tests.shared_build import build_once
from tests.training.runs import make_data, train_here

# The session fixtures are built once per pytest run and shared by the xdist workers
# (tests/shared_build.py): read-only.


def _init(tmp_path_factory, name: str, data, seed: int, **kwargs):
    """Initial weights saved without training, in this process (no start-up cost)."""
    return build_once(tmp_path_factory, name, lambda d: train_here(init_args(data, d, seed=seed, **kwargs))) / "checkpoints"


@pytest.fixture(scope="session")
def rl_data(tmp_path_factory):
    return build_once(tmp_path_factory, "rl_data",
                      lambda d: make_data(d, kind="sft", domains=list(DOMAINS), n=100, n_eval=10, seed=0))


@pytest.fixture(scope="session")
def student_init(rl_data, tmp_path_factory, megatron_single):
    return _init(tmp_path_factory, "student", rl_data, seed=1)


@pytest.fixture(scope="session")
def teacher_init(rl_data, tmp_path_factory, megatron_single):
    """A different random model: its log-probs differ from the student's, so the distillation
    advantage is not zero."""
    return _init(tmp_path_factory, "teacher", rl_data, seed=2)


@pytest.fixture(scope="session")
def mopd_reference(rl_data, student_init, teacher_init, tmp_path_factory, megatron_single):
    """One process, 4 MOPD steps, a checkpoint every 2: the run the others are held to."""
    from tests.rl.rl_runs import mopd_args

    return build_once(tmp_path_factory, "mopd_ref",
                      lambda d: train_here(mopd_args(rl_data, d, student_init, teacher_init, "checkpoint.every=2",
                                                     "checkpoint.keep_last=5", steps=4)))


@pytest.fixture(scope="session")
def student32(rl_data, tmp_path_factory, megatron_single):
    """The head-32 tiny model (vLLM's CPU attention size): a student for the vLLM runs."""
    from tests.rollout.vllm_utils import TINY32_ARGS

    return _init(tmp_path_factory, "student32", rl_data, seed=1, model=tuple(TINY32_ARGS))


@pytest.fixture(scope="session")
def teacher32(rl_data, tmp_path_factory, megatron_single):
    from tests.rollout.vllm_utils import TINY32_ARGS

    return _init(tmp_path_factory, "teacher32", rl_data, seed=2, model=tuple(TINY32_ARGS))


@pytest.fixture(scope="module")
def vllm_server(rl_data, tmp_path_factory):
    """One vLLM server for the runs that are given a URL (as a cluster launcher's would be);
    module-scoped: an idle vLLM CPU server still takes CPU time from the tests after it."""
    from tests.rollout.vllm_utils import start_server, tiny32

    server = start_server(tmp_path_factory.mktemp("vllm"), tiny32(), rl_data / "tokenizer")
    yield server.url
    server.stop()

import pytest

from tests.rollout.rollout_utils import make_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every module here decodes tiny models: one thread (tests/conftest.py)."""
    yield


@pytest.fixture(scope="session")
def parity_model(tmp_path_factory):
    """Random weights (greedy outputs vary: a 128-token vocabulary), a window of 5, 3 MTP
    layers drafting "repeat the last token" (accepted now and then)."""
    return make_model(tmp_path_factory.mktemp("parity"), seed=2, repeat_drafts=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 6-token vocabulary: sampled distributions can be enumerated exactly."""
    return make_model(tmp_path_factory.mktemp("tiny"), seed=2, vocab=6)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The synthetic tasks' tokenizer: vLLM servers load one even for token ids in and out."""
    from tests.training.runs import make_data

    data = make_data(tmp_path_factory.mktemp("vllm_tokenizer"), kind="sft", domains=["sort"], n=10, n_eval=2, seed=0)
    return data / "tokenizer"

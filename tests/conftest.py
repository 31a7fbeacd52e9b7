import os

os.environ.setdefault("WANDB_MODE", "disabled")

import pytest
import torch


@pytest.fixture(scope="session")
def megatron_single():
    """One-rank gloo process group with megatron's parallel state (shared by all tests)."""
    from mimo_train.parallel.setup import init_distributed

    init_distributed()
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

"""Specification of the loader: one global sample order, split over data-parallel ranks, resumable
at any data-parallel size."""

import json

import pytest
import torch

from mimo_train.data.dataset import DataConfig, DataLoader, PackedDataset
from mimo_train.data.tasks import generate, write_jsonl
from mimo_train.data.tokenizer import build_tokenizer

G = 8  # global batch


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    build_tokenizer(root / "tok")
    rows = [{"text": r["prompt"] + r["answer"]} for d in ("arithmetic", "sort") for r in generate(d, 60, seed=0)]
    write_jsonl(rows, root / "train.jsonl")
    return root


def dataset(data, **kw) -> PackedDataset:
    values = {"path": str(data / "train.jsonl"), "tokenizer": str(data / "tok"), "seq_len": 24, **kw}
    return PackedDataset(DataConfig(**values))


@pytest.fixture(scope="module")
def ds(data):
    return dataset(data)


def global_batch(ds, dp_size: int, micro_batch: int, state: dict | None = None, steps: int = 1) -> list[torch.Tensor]:
    """Each step's tokens over all ranks, ranks in order, as [G, S]."""
    loaders = [DataLoader(ds, G, micro_batch, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    for loader in loaders:
        if state:
            loader.load_state_dict(state)
    out = []
    for _ in range(steps):
        rows = [mb["tokens"].view(-1, ds.config.seq_len) for loader in loaders for mb in loader.next_global_batch()]
        out.append(torch.cat(rows))
    return out


def test_micro_batches_are_thd_rows_of_this_ranks_share(ds):
    loader = DataLoader(ds, G, micro_batch=2, dp_rank=1, dp_size=2)
    batches = loader.next_global_batch()
    assert len(batches) == 2  # 8 / 2 ranks / 2 per micro-batch
    for mb in batches:
        assert mb["tokens"].shape == mb["labels"].shape == mb["position_ids"].shape == mb["loss_mask"].shape == (1, 48)
        assert mb["cu_seqlens"][-1] == 48 and mb["cu_seqlens"].dtype == torch.int32
    expected = [ds[int(i)]["tokens"] for i in loader.global_indices(0)[4:8]]
    assert torch.equal(torch.cat([mb["tokens"][0] for mb in batches]), torch.cat(expected))


@pytest.mark.parametrize("dp_size,micro_batch", [(2, 1), (2, 2), (4, 1), (4, 2), (1, 4)])
def test_concatenating_the_ranks_gives_the_same_global_batches_for_any_dp_size(ds, dp_size, micro_batch):
    reference = global_batch(ds, 1, 1, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(global_batch(ds, dp_size, micro_batch, steps=3), reference))


@pytest.mark.parametrize("before,after", [(2, 4), (4, 1), (1, 2)])
def test_resume_continues_exactly_under_another_dp_size(ds, before, after):
    uninterrupted = global_batch(ds, before, 1, steps=5)
    loaders = [DataLoader(ds, G, 1, dp_rank=r, dp_size=before) for r in range(before)]
    for _ in range(2):
        for loader in loaders:
            loader.next_global_batch()
    state = json.loads(json.dumps(loaders[0].state_dict()))  # what a checkpoint stores
    assert state["consumed_samples"] == 2 * G
    resumed = global_batch(ds, after, 1, state=state, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[2:]))


def test_each_epoch_visits_every_sample_once_in_a_new_order(ds):
    loader = DataLoader(ds, G, 1)
    n = len(ds)
    first, second = loader.epoch_order(0), loader.epoch_order(1)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(n))
    assert first.tolist() != second.tolist()
    stream = [int(i) for step in range(0, 2 * n, G) for i in loader.global_indices(step)]
    assert stream[:n] == first.tolist() and stream[n:2 * n] == second.tolist()  # batches may straddle epochs


def test_without_shuffle_the_order_is_the_packed_order(data):
    loader = DataLoader(dataset(data, shuffle=False), G, 1)
    assert loader.global_indices(0).tolist() == list(range(G))


def test_the_order_is_a_function_of_the_seed(data, ds):
    assert DataLoader(ds, G).epoch_order(0).tolist() == DataLoader(ds, G).epoch_order(0).tolist()
    assert DataLoader(dataset(data, seed=1), G).epoch_order(0).tolist() != DataLoader(ds, G).epoch_order(0).tolist()


def test_state_dict_counts_consumed_samples_and_epochs(ds):
    loader = DataLoader(ds, G, 2, dp_rank=0, dp_size=2)
    steps = len(ds) // G + 1
    for _ in range(steps):
        loader.next_global_batch()
    state = loader.state_dict()
    assert state["consumed_samples"] == steps * G and state["epoch"] == steps * G // len(ds) == 1


def test_resuming_on_different_data_is_refused(data, ds):
    state = DataLoader(ds, G).state_dict()
    other = DataLoader(dataset(data, seq_len=32), G)
    with pytest.raises(ValueError, match="different data.*num_samples"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="seed: saved 0, now 5"):
        DataLoader(dataset(data, seed=5), G).load_state_dict(state)


def test_global_loss_tokens_is_the_loss_mask_sum_over_all_ranks(ds):
    loaders = [DataLoader(ds, G, 1, dp_rank=r, dp_size=4) for r in range(4)]
    batches = [loader.next_global_batch() for loader in loaders]
    total = sum(float(mb["loss_mask"].sum()) for rank in batches for mb in rank)
    assert total > 0
    assert all(mb["global_loss_tokens"] == total for rank in batches for mb in rank)
    assert loaders[0].global_loss_tokens(0) == total


@pytest.mark.parametrize("global_batch,dp_size,micro_batch,suggest", [(8, 3, 1, 9), (6, 2, 2, 8), (10, 4, 2, 16)])
def test_a_global_batch_not_divisible_by_dp_size_times_micro_batch_is_refused(ds, global_batch, dp_size,
                                                                              micro_batch, suggest):
    with pytest.raises(ValueError, match=rf"global_batch={global_batch} must be divisible .* "
                                         rf"{dp_size} x {micro_batch}.*global_batch={suggest}"):
        DataLoader(ds, global_batch, micro_batch, dp_rank=0, dp_size=dp_size)


def test_a_bad_rank_is_refused(ds):
    with pytest.raises(ValueError, match="dp_rank=2"):
        DataLoader(ds, G, 1, dp_rank=2, dp_size=2)


def test_a_global_batch_larger_than_the_dataset_cycles_through_epochs(ds):
    big = 4 * len(ds)
    indices = DataLoader(ds, big, 1).global_indices(0)
    assert sorted(indices.tolist()) == sorted(list(range(len(ds))) * 4)

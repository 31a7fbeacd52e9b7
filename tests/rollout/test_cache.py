"""The KV cache is shaped for the architecture: SWA and MTP layers keep ring buffers whose size
does not depend on the sequence length, global layers keep full caches, and rejected drafts
are rolled out of the rings."""

import pytest

from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from tests.rollout.rollout_utils import random_prompts


def test_swa_cache_size_is_independent_of_length(parity_model):
    sizes = {max_len: Engine(parity_model.cfg, parity_model.weights, EngineConfig(device="cpu", max_batch=2, max_len=max_len)
                             ).cache.nbytes() for max_len in (64, 512)}
    assert sizes[64]["swa"] == sizes[512]["swa"] > 0
    assert sizes[64]["mtp"] == sizes[512]["mtp"] > 0
    assert sizes[512]["global"] > 7 * sizes[64]["global"]


@pytest.fixture(scope="module")
def engine(parity_model):
    return Engine.from_pretrained(parity_model.path, EngineConfig(device="cpu", max_batch=2, max_len=256))


def test_rings_stay_put_and_hold_exactly_the_window(engine, parity_model):
    """Generate far past the ring size (greedy, K = 3, drafts often rejected). After every step
    each ring holds the positions the next query needs and none of a rejected draft, in the
    same tensors it started with."""
    cache, window = engine.cache, parity_model.cfg.sliding_window_size
    tensors = [t.data_ptr() for t in cache.tensors()]
    engine.fixed_depth = 3
    for i, p in enumerate(random_prompts(parity_model.cfg, [13, 4], seed=4)):
        engine.add_request(p, SamplingParams(temperature=0.0, max_new_tokens=120), prompt_index=i)
    while engine.n or engine.waiting:
        engine.step()
        for r in range(engine.n):
            last = int(engine.state.length[r]) - 2  # the newest token has no KV entry yet
            # Main SWA layers: the next verify's first query (last + 1) sees last + 1 - window ...
            # MTP layers: the next draft chain recomputes the last 2K positions, then looks back.
            for labels, first_query in ((cache.ring_pos[r], last + 1), (cache.mtp_pos[r], last + 1 - 6)):
                kept = set(labels.tolist()) - {-1}
                assert max(kept) <= last  # nothing beyond the accepted tokens
                assert set(range(max(0, first_query - window), first_query)) <= kept
    engine.fixed_depth = None
    assert sum(engine._drafts.proposed) > sum(engine._drafts.accepted) > 0  # drafts were kept and rejected
    assert [t.data_ptr() for t in cache.tensors()] == tensors
    assert cache.ring < 20 < 120  # the sequences outgrew the rings many times over

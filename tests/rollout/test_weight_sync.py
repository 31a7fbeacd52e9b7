"""`update_weights` in process and over torch.distributed (gloo): main and MTP layers by serving
name, versioned, checked before anything is written -- a bad update changes nothing and the
engine keeps serving."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from mimo_train.model.hf_mapping import WeightNameError
from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from tests.rollout import sync_worker
from tests.rollout.rollout_utils import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)


def perturbed(weights, scale=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in weights.items()}


def tokens(engine, prompts, depth=2):
    completions, metrics = engine.generate(prompts, GREEDY, depth=depth)
    return [c.tokens for c in completions], completions, metrics


@pytest.fixture(scope="module")
def setup(parity_model):
    cfg = parity_model.cfg
    new = perturbed(parity_model.weights)
    prompts = random_prompts(cfg, [9, 14], seed=11)
    reference, _, _ = tokens(Engine(cfg, new, EngineConfig(device="cpu", max_batch=2, max_len=128)), prompts)
    return cfg, parity_model.weights, new, prompts, reference


def test_update_in_process_is_versioned(setup):
    cfg, base, new, prompts, reference = setup
    engine = Engine(cfg, base, EngineConfig(device="cpu", max_batch=2, max_len=128))
    before, completions, _ = tokens(engine, prompts)
    assert engine.version == 0 and all(c.policy_version == 0 for c in completions)
    assert before != reference  # the update matters
    assert engine.update_weights(new) == 1
    after, completions, _ = tokens(engine, prompts)
    assert after == reference
    assert all(c.policy_version == c.policy_version_end == 1 for c in completions)
    assert engine.update_weights(new.items(), version=42) == 42


def test_mtp_only_update_changes_drafts_not_outputs(setup):
    """The MTP layers propose, the main model decides: new MTP weights change acceptance but
    (greedy) not a single output token."""
    cfg, base, new, prompts, _ = setup
    engine = Engine(cfg, base, EngineConfig(device="cpu", max_batch=2, max_len=128))
    before, _, m0 = tokens(engine, prompts, depth=3)
    engine.update_weights({k: v for k, v in perturbed(base, scale=1.0, seed=3).items() if ".mtp." in k})
    after, _, m1 = tokens(engine, prompts, depth=3)
    assert after == before
    assert m0.acceptance_per_position != m1.acceptance_per_position


def test_bad_updates_change_nothing(setup):
    cfg, base, new, prompts, _ = setup
    engine = Engine(cfg, base, EngineConfig(device="cpu", max_batch=2, max_len=128))
    before, _, _ = tokens(engine, prompts)
    state = {k: v.clone() for k, v in engine.state_dict().items()}
    name = "model.layers.1.self_attn.o_proj.weight"
    cases = {
        "unknown name(s): model.layers.1.self_attn.made_up.weight": {**new, "model.layers.1.self_attn.made_up.weight": torch.zeros(2)},
        f"{name}: shape (3, 3)": {**new, name: torch.zeros(3, 3)},
        "not a tensor": {name: [1.0, 2.0]},
    }
    for message, update in cases.items():
        with pytest.raises(WeightNameError, match=message.replace("(", r"\(").replace(")", r"\)")):
            engine.update_weights(update)
        assert engine.version == 0
        assert all(torch.equal(state[k], v) for k, v in engine.state_dict().items())
    assert tokens(engine, prompts)[0] == before


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_update_from_another_process_over_gloo(setup, tmp_path):
    cfg, base, new, prompts, reference = setup
    torch.save({"config": cfg.to_hub_dict(), "base": base, "new": new, "prompts": prompts}, tmp_path / "data.pt")
    mp.start_processes(sync_worker.run, args=(free_port(), str(tmp_path / "data.pt"), str(tmp_path / "out.pt")),
                       nprocs=2, start_method="spawn")
    out = torch.load(tmp_path / "out.pt")
    assert out["version"] == 7 and out["policy_versions"] == [7, 7]
    assert "unknown name(s): model.not_a_weight" in out["error"] and "shape (3, 3)" in out["error"]
    assert out["tokens"] == reference

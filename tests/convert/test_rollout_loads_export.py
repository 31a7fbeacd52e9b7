"""The rollout engine loads an exported directory directly: every weight (MTP layers included)
arrives unchanged, and greedy decoding with MTP drafting equals transformers' greedy decoding
of the same export."""

import pytest
import torch
from safetensors.torch import load_file

from tests.convert.conftest import run_config
from tests.model.hf_utils import load_transformers

rollout = pytest.importorskip("mimo_train.rollout")


def test_engine_loads_the_export(exported):
    directory = exported[0]
    engine = rollout.Engine.from_pretrained(directory, rollout.EngineConfig(max_batch=2, max_len=64, dtype=torch.float32))
    weights = {}
    for shard in directory.glob("model-*.safetensors"):
        weights.update(load_file(str(shard)))
    state = engine.state_dict()
    assert set(state) == set(weights)
    assert all(torch.equal(state[n], weights[n]) for n in weights)

    cfg = run_config()
    prompt = torch.randint(3, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    params = rollout.SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    completions, _ = engine.generate([prompt], params, depth=cfg.num_nextn_predict_layers)
    hf = load_transformers(directory)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(8):
            logits = hf(ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    assert completions[0].tokens == ids[0, len(prompt):].tolist()

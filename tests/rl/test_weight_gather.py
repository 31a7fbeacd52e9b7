"""The trainer -> engine weight path: megatron's live shards, assembled under serving names,
are exactly the model's own weights (TP/PP/EP layouts are covered by the world-size-2 RL
runs, whose second step samples from gathered weights)."""

import torch

from mimo_train.model.config import ModelConfig
from mimo_train.model.gpt import build_model
from mimo_train.model.hf_mapping import to_hf
from mimo_train.rl.weight_gather import gather_serving_weights


def test_gathered_weights_are_the_models_weights_under_serving_names(megatron_single):
    cfg = ModelConfig.preset("tiny")
    model = build_model(cfg)
    with torch.no_grad():  # every tensor distinct, the expert bias included
        for p in model.parameters():
            p.normal_()
        for name, b in model.named_buffers():
            if "expert_bias" in name:
                b.normal_()
    gathered = gather_serving_weights([model], cfg)
    expected = to_hf({k: v for k, v in model.state_dict().items() if "_extra_state" not in k}, cfg)
    assert sorted(gathered) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(gathered[name], tensor.float()), name
    assert any(".mtp." in n for n in gathered) and any("e_score_correction_bias" in n for n in gathered)

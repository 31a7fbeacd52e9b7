"""tools/bench_rollout.py --train-demo: once depth 1 has learned the periodic copy task, the MTP
layers whose depth has not restart as copies of MTP layer 0 with fresh optimizer state (without
that, depth 3 stays at chance in the default 400 steps: issue 19), and the run reports each
depth's accuracy on held-out sequences."""

import json

import torch

from mimo_train.model.config import ModelConfig
from mimo_train.model.gpt import build_model
from tools.bench_rollout import LEARNED, copy_mtp_layer0, train_demo, unlearned_mtp_layers


def mtp_layer(model, k: int) -> dict[str, torch.Tensor]:
    prefix = f"mtp.layers.{k}."
    return {n.removeprefix(prefix): t for n, t in model.state_dict().items()
            if n.startswith(prefix) and isinstance(t, torch.Tensor)}


def test_copied_layers_equal_layer_0_and_lose_their_optimizer_state(megatron_single):
    model = build_model(ModelConfig.preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 19, (2, 24))
    out = model(ids, labels=ids, loss_mask=torch.ones(2, 24))
    sum(loss.mean() for loss in out.losses).backward()
    opt.step()
    params = dict(model.named_parameters())
    layer1_before = {n: t.clone() for n, t in mtp_layer(model, 1).items()}

    copy_mtp_layer0(model, [2], opt)

    layer0, layer2 = mtp_layer(model, 0), mtp_layer(model, 2)
    assert layer0.keys() == layer2.keys() and len(layer0) > 10
    for name, t in layer0.items():
        assert torch.equal(layer2[name], t), name
    assert any(not torch.equal(layer1_before[n], layer0[n]) for n in layer0)  # they did differ
    for name, t in mtp_layer(model, 1).items():
        assert torch.equal(t, layer1_before[name]), f"layer 1 was not to be touched: {name}"
    for name, p in params.items():
        has_state = p in opt.state and len(opt.state[p]) > 0
        assert has_state == (not name.startswith("mtp.layers.2.")), name
    opt.step()  # Adam starts the copies' moments afresh


def test_layers_restart_only_once_depth_1_has_learned_and_only_those_that_have_not():
    below, above = LEARNED - 0.01, LEARNED
    assert unlearned_mtp_layers({"acc/mtp_1": below, "acc/mtp_2": 0.06, "acc/mtp_3": 0.06}, 3) == []
    assert unlearned_mtp_layers({"acc/mtp_1": above, "acc/mtp_2": 0.06, "acc/mtp_3": 0.06}, 3) == [1, 2]
    assert unlearned_mtp_layers({"acc/mtp_1": 0.8, "acc/mtp_2": 0.79, "acc/mtp_3": 0.06}, 3) == [2]
    assert unlearned_mtp_layers({"acc/mtp_1": 0.8, "acc/mtp_2": 0.79, "acc/mtp_3": 0.7}, 3) == []
    assert unlearned_mtp_layers({"acc/mtp_1": 0.9}, 1) == []


def test_the_demo_reports_every_depths_held_out_accuracy(tmp_path, megatron_single):
    result = train_demo(tmp_path / "demo", 2, 0.3, False, preset="tiny", progress=False)
    assert set(result["held_out"]) == {"acc/main", "acc/mtp_1", "acc/mtp_2", "acc/mtp_3"}
    assert all(0.0 <= v <= 1.0 for v in result["held_out"].values())
    assert result["replicated_mtp_layer0"] is None  # two steps learn nothing
    assert (tmp_path / "demo" / "model.safetensors").exists()
    assert len(json.loads((tmp_path / "demo" / "bench_prompts.json").read_text())) == 16


def test_the_restart_happens_inside_training_and_reaches_the_export(tmp_path, megatron_single, monkeypatch):
    """train_demo itself calls the restart: with depths 2 and 3 declared unlearned after the first
    step, a 1-step run reports it and exports MTP layers 1 and 2 equal to layer 0."""
    from safetensors.torch import load_file

    import tools.bench_rollout as bench

    monkeypatch.setattr(bench, "unlearned_mtp_layers", lambda metrics, depths: [1, 2])
    result = bench.train_demo(tmp_path / "demo", 1, 0.3, False, preset="tiny", progress=False)
    assert result["replicated_mtp_layer0"] == {"step": 0, "layers": [1, 2]}
    weights = load_file(str(tmp_path / "demo" / "model.safetensors"))
    layer0 = {n.split("mtp.layers.0.", 1)[1]: t for n, t in weights.items() if "mtp.layers.0." in n}
    assert len(layer0) > 10
    for k in (1, 2):
        for name, t in layer0.items():
            assert torch.equal(weights[next(n for n in weights if n.endswith(f"mtp.layers.{k}.{name}"))], t), (k, name)

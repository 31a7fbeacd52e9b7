"""Recipes compose into typed, validated configs; mistakes are one line naming the key."""

import pytest

from mimo_train.model.config import ModelConfig
from mimo_train.parallel.layout import LayoutError, check_layout
from mimo_train.training.config import ConfigError, load_config


def test_recipes_compose_with_overrides():
    cfg = load_config(["recipe=sft", "model=tiny", "parallel.tp=2", "optim=wsd", "train.steps=50"])
    assert cfg.recipe == "sft" and cfg.data.kind == "sft" and cfg.parallel.tp == 2
    assert cfg.optim.schedule == "wsd" and cfg.model.hidden_size == 64 and cfg.train.steps == 50
    assert str(cfg.run_dir) == "runs/sft" and str(cfg.checkpoint_dir) == "runs/sft/checkpoints"
    assert load_config(["recipe=pretrain"]).model == ModelConfig.preset("small")


@pytest.mark.parametrize("override, needle", [
    ("optim.schedule=linear", "optim.schedule"),
    ("logging.wandb_mode=sometimes", "logging.wandb_mode"),
    ("parallel.vpp=2", "parallel.vpp"),
    ("optim.warmup_steps=1000", "optim.warmup_steps"),
    ("data.bad_rows=ignore", "bad_rows"),
    ("model.num_hidden_layers=5", "hybrid_layer_pattern"),
])
def test_bad_values_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(["recipe=pretrain", override])


def test_layout_messages_say_what_would_work():
    tiny = ModelConfig.preset("tiny")
    with pytest.raises(LayoutError, match=r"world size 3 is not divisible by tp\*pp = 2"):
        check_layout(tiny, 3, 2, 1, 1, None, 8, 1)
    with pytest.raises(LayoutError, match="global_batch=6 is not divisible by dp\\*micro_batch = 2\\*2"):
        check_layout(tiny, 2, 1, 1, 1, None, 6, 2)
    layout = check_layout(tiny, 4, 1, 2, 2, None, 8, 1)
    assert (layout.dp, layout.ep) == (2, 2)

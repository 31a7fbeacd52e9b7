"""A refused parallel layout names what would fit: the parallel sizes that divide the model,
and the model overrides that would make the requested layout valid (which, applied, pass)."""

import re

import pytest

from mimo_train.parallel.layout import LayoutError, check_layout
from mimo_train.training.config import load_config


def layout_of(args: list[str], world: int):
    config = load_config(["recipe=pretrain", *args])
    p = config.parallel
    return check_layout(config.model, world, p.tp, p.pp, p.ep, p.vpp, config.train.global_batch,
                        config.train.micro_batch)


def refusal(args: list[str], world: int) -> str:
    with pytest.raises(LayoutError) as err:
        layout_of(args, world)
    return str(err.value)


@pytest.mark.parametrize("args, world, needle, overrides", [
    # The README's TP x PP example on the demo model (1 global kv head).
    (["model=small", "parallel.tp=2", "parallel.pp=2"], 4, "tp=2 does not divide the 1 global kv heads",
     ["model.num_key_value_heads=2"]),
    # 6 heads: tp=4 needs 8 heads on both layer kinds, and kv heads that 4 divides.
    (["model=small", "parallel.tp=4"], 4, "tp=4 does not divide the 6 global attention heads",
     ["model.num_attention_heads=8", "model.swa_num_attention_heads=8", "model.num_key_value_heads=4",
      "model.swa_num_key_value_heads=4"]),
    (["model=tiny", "parallel.ep=3", "train.global_batch=6"], 3, "ep=3 does not divide the 8 experts",
     ["model.n_routed_experts=9"]),
])
def test_refusal_names_the_model_overrides_that_fit(args, world, needle, overrides):
    message = refusal(args, world)
    assert needle in message and "can be one of" in message
    named = re.findall(r"model\.\w+=\d+", message.split("the model overrides that fit this layout:")[1])
    assert named == overrides
    layout_of(args + named, world)  # the named overrides do make the layout valid


def test_layers_that_pp_does_not_divide_name_the_layer_count():
    message = refusal(["model=tiny", "parallel.pp=4"], 4)
    assert "pp*vpp = 4 does not divide the 6 layers" in message
    assert "model.num_hidden_layers=8 (with model.hybrid_layer_pattern and model.moe_layer_freq of 8 entries)" in message


def test_a_valid_layout_passes():
    layout = layout_of(["model=small", "model.num_key_value_heads=2", "parallel.tp=2", "parallel.pp=2"], 4)
    assert (layout.tp, layout.pp, layout.dp) == (2, 2, 1)


@pytest.mark.parametrize("batch, fit", [
    (["train.global_batch=8", "train.micro_batch=2"], "set train.micro_batch=4, or parallel.vpp=null"),
    (["train.global_batch=5", "train.micro_batch=1"], "set train.global_batch=2, or parallel.vpp=null"),
])
def test_interleaved_pipeline_needs_pp_micro_batches(batch, fit):
    """Interleaved 1F1B with more micro-batches than stages drifts from one process (see
    layout.py): refused, with the batch setting that fits."""
    args = ["model=tiny", "parallel.pp=2", "parallel.vpp=3", *batch]
    message = refusal(args, 2)
    assert "exactly pp=2 micro-batches per step" in message and fit in message
    fixed = re.search(r"set (train\.\w+=\d+)", message).group(1)
    assert layout_of(args + [fixed], 2).vpp == 3

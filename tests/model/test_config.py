"""ModelConfig: presets, hub config.json round trip, transformers' config names, validation."""

import json

import pytest
from transformers import MiMoV2FlashConfig

from mimo_train.model.config import ModelConfig


def test_release_preset_has_the_release_pattern():
    cfg = ModelConfig.preset("mimo_v2_flash")
    assert cfg.hybrid_layer_pattern.count(0) == 9 and cfg.hybrid_layer_pattern.count(1) == 39
    assert [i for i, t in enumerate(cfg.hybrid_layer_pattern) if t == 0] == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    assert cfg.moe_layer_freq == [0] + [1] * 47
    assert cfg.attention_dims(swa=True)["rotary_dim"] == 64
    assert cfg.attention_dims(swa=True)["num_kv_heads"] == 8 and cfg.attention_dims(swa=False)["num_kv_heads"] == 4


@pytest.mark.parametrize("name", ["tiny", "small", "mimo_v2_flash"])
def test_hub_dict_round_trip(tmp_path, name):
    cfg = ModelConfig.preset(name)
    cfg.save(tmp_path)
    assert ModelConfig.from_json(tmp_path) == cfg
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "mimo_v2_flash" and raw["architectures"] == ["MiMoV2FlashForCausalLM"]
    for field in ("hybrid_layer_pattern", "moe_layer_freq", "swa_num_key_value_heads", "sliding_window_size",
                  "add_swa_attention_sink_bias", "swa_rope_theta", "scoring_func", "topk_method", "layernorm_epsilon"):
        assert field in raw


def test_reads_config_written_by_transformers(tmp_path):
    hf = MiMoV2FlashConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=12, v_head_dim=8, sliding_window=17,
                           layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
                           mlp_layer_types=["dense", "dense", "sparse", "sparse"], n_routed_experts=4,
                           num_experts_per_tok=2, rms_norm_eps=1e-6)
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_json(tmp_path)
    assert cfg.hybrid_layer_pattern == [0, 1, 0, 1]
    assert cfg.moe_layer_freq == [0, 0, 1, 1]
    assert cfg.sliding_window_size == 16  # transformers counts the query itself
    assert cfg.swa_num_key_value_heads == 2 and cfg.num_key_value_heads == 1
    assert (cfg.swa_head_dim, cfg.swa_v_head_dim) == (12, 8)
    assert cfg.layernorm_epsilon == 1e-6 and cfg.swa_rope_theta == 10_000.0 and cfg.rope_theta == 5_000_000.0
    assert cfg.num_nextn_predict_layers == 0


def test_transformers_reads_our_config_json(tmp_path):
    cfg = ModelConfig.preset("tiny")
    cfg.save(tmp_path)
    hf = MiMoV2FlashConfig.from_pretrained(tmp_path)
    assert hf.layer_types == ["full_attention"] + ["sliding_attention"] * 4 + ["full_attention"]
    assert hf.sliding_window == cfg.sliding_window_size + 1
    assert hf.num_key_value_heads == cfg.num_key_value_heads
    assert not cfg.transformers_compatible()


@pytest.mark.parametrize("override, message", [
    ({"hybrid_layer_pattern": [0, 1]}, "hybrid_layer_pattern has 2 entries for 6 layers"),
    ({"num_key_value_heads": 3}, "not divisible by 3 kv heads"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok=9"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"not_a_field": 1}, "unknown field(s) ['not_a_field']"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ValueError) as err:
        ModelConfig.preset("tiny", **override)
    assert message in str(err.value)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="known presets"):
        ModelConfig.preset("gpt5")


@pytest.mark.parametrize("override, message", [
    ({"norm_topk_prob": False}, "norm_topk_prob=False is not supported"),
    ({"num_experts_per_tok": 1}, "use top-k >= 2"),
])
def test_routing_megatron_cannot_match_is_refused(override, message):
    from mimo_train.model.spec import transformer_config

    with pytest.raises(ValueError, match=message):
        transformer_config(ModelConfig.preset("tiny", **override))


def test_mtp_feed_is_written_to_config_json_and_absent_means_chained(tmp_path):
    from mimo_train.convert.serving import hub_config

    cfg = ModelConfig.preset("tiny", mtp_feed="target_hidden")
    cfg.save(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["mtp_feed"] == "target_hidden" and ModelConfig.from_json(tmp_path) == cfg
    assert hub_config(cfg, dtype="bf16", mtp=True, fp8_block=None)["mtp_feed"] == "target_hidden"  # export's file
    del raw["mtp_feed"]  # the release's config.json has no such key
    assert ModelConfig.from_hub_dict(raw).mtp_feed == "chained"

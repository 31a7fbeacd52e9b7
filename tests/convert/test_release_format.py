"""The export is the release's serving format: its key set is the release's naming list
(docs/export.md, "Serving names"; written out here independently of hf_mapping), config.json carries the hub
field names, the shards respect --shard-size and the index, and the side files are there."""

import json

import torch
from safetensors import safe_open

from mimo_train.convert import export_checkpoint
from mimo_train.convert.serving import parse_size
from tests.convert.conftest import SHARD_SIZE, run_config

# The release's hub field names, which config.json must carry (docs/architecture.md).
HUB_FIELDS = ["hybrid_layer_pattern", "moe_layer_freq", "swa_num_attention_heads", "swa_num_key_value_heads",
              "swa_head_dim", "swa_v_head_dim", "head_dim", "v_head_dim", "sliding_window_size",
              "add_swa_attention_sink_bias", "add_full_attention_sink_bias", "rope_theta", "swa_rope_theta",
              "partial_rotary_factor", "attention_value_scale", "n_routed_experts", "num_experts_per_tok",
              "moe_intermediate_size", "intermediate_size", "scoring_func", "topk_method", "n_group", "topk_group",
              "norm_topk_prob", "routed_scaling_factor", "layernorm_epsilon"]


def release_names(cfg, mtp: bool = True) -> set[str]:
    """The weight names the release uses, for this config."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}

    def block(p: str, swa: bool, moe: bool, norm_before_mlp: str):
        names.update(f"{p}self_attn.{x}_proj.weight" for x in "qkvo")
        names.update({f"{p}input_layernorm.weight", f"{p}{norm_before_mlp}.weight"})
        if swa:
            names.add(f"{p}self_attn.attention_sink_bias")
        if moe:
            names.update({f"{p}mlp.gate.weight", f"{p}mlp.gate.e_score_correction_bias"})
            names.update(f"{p}mlp.experts.{e}.{x}_proj.weight" for e in range(cfg.n_routed_experts)
                         for x in ("gate", "up", "down"))
        else:
            names.update(f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down"))

    for i in range(cfg.num_hidden_layers):
        block(f"model.layers.{i}.", cfg.hybrid_layer_pattern[i] == 1, cfg.moe_layer_freq[i] == 1,
              "post_attention_layernorm")
    for k in range(cfg.num_nextn_predict_layers if mtp else 0):
        p = f"model.mtp.layers.{k}."
        names.update(f"{p}{n}.weight" for n in ("enorm", "hnorm", "eh_proj", "final_layernorm"))
        block(p, True, False, "pre_mlp_layernorm")  # MTP blocks: SWA attention with sinks, dense FFN
    return names


def stored(directory) -> dict[str, tuple[str, torch.dtype, tuple]]:
    out = {}
    for file in sorted(directory.glob("model-*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                out[name] = (file.name, f.get_tensor(name).dtype, tuple(t.get_shape()))
    return out


def test_key_set_is_the_release_naming(exported):
    directory = exported[0]
    cfg = run_config()
    files = stored(directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    assert set(files) == set(index["weight_map"]) == release_names(cfg)
    assert {n: f for n, (f, _, _) in files.items()} == index["weight_map"]
    assert {n for n in files if n.endswith("attention_sink_bias")} == \
        {f"model.layers.{i}.self_attn.attention_sink_bias" for i in (1, 2, 3, 4)} | \
        {f"model.mtp.layers.{k}.self_attn.attention_sink_bias" for k in range(3)}
    assert all(dtype == torch.float32 for _, dtype, _ in files.values())


def test_config_and_side_files(exported, data_dir):
    directory = exported[0]
    hub = json.loads((directory / "config.json").read_text())
    assert hub["model_type"] == "mimo_v2_flash" and hub["architectures"] == ["MiMoV2FlashForCausalLM"]
    assert not [f for f in HUB_FIELDS if f not in hub]
    assert hub["scoring_func"] == "sigmoid" and hub["topk_method"] == "noaux_tc"
    assert hub["num_nextn_predict_layers"] == 3 and hub["torch_dtype"] == "float32"
    assert "quantization_config" not in hub
    gen = json.loads((directory / "generation_config.json").read_text())
    assert gen["eos_token_id"] == run_config().eos_token_id
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (directory / name).read_bytes() == (data_dir / "tokenizer" / name).read_bytes()


def test_shards_respect_the_shard_size(exported):
    directory = exported[0]
    limit = parse_size(SHARD_SIZE)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == sorted(p.name for p in directory.glob("model-*.safetensors"))
    total = 0
    for shard in shards:
        with safe_open(str(directory / shard), "pt") as f:
            sizes = [f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys()]
        assert sum(sizes) <= limit or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total


def test_bf16_without_mtp(trained, exported, tmp_path):
    out = tmp_path / "bf16"
    export_checkpoint(trained, out, dtype="bf16", mtp=False, progress=False)
    files = stored(out)
    assert set(files) == release_names(run_config(), mtp=False)
    hub = json.loads((out / "config.json").read_text())
    assert hub["num_nextn_predict_layers"] == 0 and hub["torch_dtype"] == "bfloat16"
    # The router bias only ranks experts and stays fp32; everything else is bf16, rounded from fp32.
    for name, (file, dtype, _) in files.items():
        want = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert dtype == want, name
    with safe_open(str(out / files["model.layers.1.mlp.experts.3.up_proj.weight"][0]), "pt") as f:
        bf16 = f.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight")
    fp32_index = json.loads((exported[0] / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(exported[0] / fp32_index["model.layers.1.mlp.experts.3.up_proj.weight"]), "pt") as f:
        fp32 = f.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight")
    assert torch.equal(bf16, fp32.to(torch.bfloat16))

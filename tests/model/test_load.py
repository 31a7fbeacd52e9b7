"""load_hf refuses bad checkpoints with an error that names the problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import mimo_train
from mimo_train.model.config import ModelConfig
from tests.model.hf_utils import hf_model, random_config


@pytest.fixture()
def checkpoint(tmp_path):
    cfg = random_config(5)
    hf_model(cfg).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt", cfg


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mimo_train.load_hf(tmp_path / "nope")


def test_unknown_and_missing_names_are_listed(checkpoint, megatron_single):
    path, _ = checkpoint
    weights = load_file(str(path / "model.safetensors"))
    weights["model.layers.1.self_attn.made_up.weight"] = torch.zeros(1)
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        mimo_train.load_hf(path)
    assert "model.layers.0.mlp.up_proj.weight" in str(err.value)
    assert "model.layers.1.self_attn.made_up.weight" in str(err.value)


def test_index_pointing_to_missing_shard(checkpoint):
    path, _ = checkpoint
    weights = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    index = {"weight_map": {k: "model-00001-of-00001.safetensors" for k in weights}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00001.safetensors"):
        mimo_train.load_hf(path)


def test_truncated_shard(checkpoint):
    path, _ = checkpoint
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        mimo_train.load_hf(path)


def test_config_shapes_disagree_with_weights(checkpoint, megatron_single):
    path, cfg = checkpoint
    raw = json.loads((path / "config.json").read_text())
    raw["moe_intermediate_size"] = cfg.moe_intermediate_size * 2
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="does not match the config"):
        mimo_train.load_hf(path)


def test_mtp_layers_counted_from_weights(checkpoint, megatron_single):
    path, _ = checkpoint
    handle = mimo_train.load_hf(path)
    assert handle.config.num_nextn_predict_layers == 0
    assert len(handle.all_logits(torch.zeros(1, 4, dtype=torch.long))) == 1
    assert isinstance(handle.config, ModelConfig)

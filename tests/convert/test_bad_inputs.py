"""Bad input is a clear error before anything is written, and no output is ever left half
written as if complete (nor a stray `<out>.tmp`)."""

import json
import shutil

import pytest

from mimo_train.convert import ConvertError, export_checkpoint, exporter, import_serving
from mimo_train.convert.dist_reader import DistCheckpoint
from tests.convert.conftest import tool


def nothing_written(out) -> bool:
    return not out.exists() and not out.with_name(out.name + ".tmp").exists()


@pytest.fixture()
def serving(exported, tmp_path):
    return shutil.copytree(exported[0], tmp_path / "serving")


@pytest.fixture()
def training(trained, tmp_path):
    iter_dir = DistCheckpoint(trained).path
    return shutil.copytree(iter_dir, tmp_path / "ckpt" / iter_dir.name)


def shard_of(directory, name: str):
    return directory / json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][name]


# ---- import: serving directory -> training checkpoint ------------------------------------------

def test_import_truncated_shard(serving, tmp_path):
    shard = shard_of(serving, "model.layers.2.mlp.experts.1.down_proj.weight")
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ConvertError, match=f"{shard.name} is truncated"):
        import_serving(serving, tmp_path / "out")
    assert nothing_written(tmp_path / "out")


def test_import_missing_shard(serving, tmp_path):
    shard = shard_of(serving, "lm_head.weight")
    shard.unlink()
    with pytest.raises(ConvertError, match=f"missing shard.*{shard.name}"):
        import_serving(serving, tmp_path / "out")
    assert nothing_written(tmp_path / "out")


def test_import_index_points_to_a_missing_file(serving, tmp_path):
    index_file = serving / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(ConvertError, match="model-00099-of-00099.safetensors"):
        import_serving(serving, tmp_path / "out")
    assert nothing_written(tmp_path / "out")


def test_import_index_disagrees_with_the_shards(serving, tmp_path):
    index_file = serving / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    here = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.norm.weight"] = next(f for f in index["weight_map"].values() if f != here)
    index_file.write_text(json.dumps(index))
    with pytest.raises(ConvertError, match="model.norm.weight"):
        import_serving(serving, tmp_path / "out")


def test_import_config_shapes_do_not_match_the_weights(serving, tmp_path):
    raw = json.loads((serving / "config.json").read_text())
    raw["moe_intermediate_size"] *= 2
    (serving / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConvertError, match=r"shape mismatch.*experts\.\d+\.(gate|up|down)_proj.*config.json implies"):
        import_serving(serving, tmp_path / "out")
    assert nothing_written(tmp_path / "out")


def test_import_cli_says_what_is_wrong(serving, tmp_path):
    shard_of(serving, "model.norm.weight").unlink()
    with pytest.raises(SystemExit, match="import_hf: error: .*missing shard"):
        tool("import_hf").main(["--hf", str(serving), "--out", str(tmp_path / "out")])
    assert nothing_written(tmp_path / "out")


# ---- export: training checkpoint -> serving directory ------------------------------------------

def storage_of(iter_dir, key: str):
    ck = DistCheckpoint(iter_dir)
    return next(info for index, info in ck.metadata.storage_data.items() if index.fqn == key)


def test_export_missing_data_file(training, tmp_path):
    (training / storage_of(training, "output_layer.weight").relative_path).unlink()
    with pytest.raises(ConvertError, match="incomplete: missing file"):
        export_checkpoint(training, tmp_path / "out", progress=False)
    assert nothing_written(tmp_path / "out")


def test_export_truncated_data_file(training, tmp_path):
    info = storage_of(training, "decoder.layers.3.mlp.experts.experts.linear_fc2.weight")
    file = training / info.relative_path
    file.write_bytes(file.read_bytes()[: info.offset + info.length - 1])
    with pytest.raises(ConvertError, match="truncated file"):
        export_checkpoint(training, tmp_path / "out", progress=False)
    assert nothing_written(tmp_path / "out")


def test_export_config_shapes_do_not_match_the_weights(training, tmp_path):
    state = json.loads((training / "mimo_state.json").read_text())
    state["model"]["intermediate_size"] = 96
    (training / "mimo_state.json").write_text(json.dumps(state))
    with pytest.raises(ConvertError, match=r"shape mismatch.*linear_fc1.weight: stored \(256, 64\), config implies \(192, 64\)"):
        export_checkpoint(training, tmp_path / "out", progress=False)
    assert nothing_written(tmp_path / "out")


def test_export_of_something_else(tmp_path):
    (tmp_path / "not_a_ckpt").mkdir()
    with pytest.raises(ConvertError, match="not a complete mimo-train checkpoint"):
        export_checkpoint(tmp_path / "not_a_ckpt", tmp_path / "out")


def test_export_failing_halfway_leaves_nothing(trained, tmp_path, monkeypatch):
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("No space left on device")
        return real_save(tensors, path, metadata=metadata)

    real_save = exporter.save_file
    monkeypatch.setattr(exporter, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        export_checkpoint(trained, tmp_path / "out", shard_size="100KB", progress=False)
    assert len(calls) == 3 and nothing_written(tmp_path / "out")


def test_export_never_clobbers_an_existing_output(trained, data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="already exists"):
        export_checkpoint(trained, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ConvertError, match="holds no tokenizer files"):
        export_checkpoint(trained, tmp_path / "other", tokenizer=data_dir, progress=False)
    assert nothing_written(tmp_path / "other")
    export_checkpoint(trained, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()

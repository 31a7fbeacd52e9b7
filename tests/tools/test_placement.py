"""tools/placement.py's arithmetic (docs/placement.md quotes it): parameter counts agree with the
megatron model built on the meta device, the KV cache of a sequence is worked by hand, and the
memory and sync figures follow from their stated assumptions."""

import importlib.util
from pathlib import Path

import pytest

from mimo_train.model.config import ModelConfig
from mimo_train.model.params import count_parameters

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("placement", ROOT / "tools" / "placement.py")
placement = importlib.util.module_from_spec(spec)
spec.loader.exec_module(placement)


@pytest.mark.parametrize("model", ["tiny", "mimo_v2_flash"])
def test_parameter_counts_are_the_models(model, megatron_single):
    cfg = ModelConfig.preset(model)
    from_shapes, built = placement.parameters(model), count_parameters(cfg)
    # Shapes also hold each MoE router's expert bias, a buffer in the model (not a parameter).
    bias = sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers)) * cfg.n_routed_experts
    assert from_shapes["experts"] + from_shapes["dense"] == built["total"] + bias
    assert from_shapes["mtp"] == built["mtp"]


def test_kv_cache_of_a_sequence_by_hand():
    # tiny: global layers 0 and 5 keep every token, 1 kv head x (24 + 16) channels x 2 bytes = 80 B;
    # SWA layers 1-4 keep window + 1 = 9 tokens, 2 kv heads: 160 B each.
    assert placement.kv_bytes_per_sequence("tiny", 100) == 2 * 100 * 80 + 4 * 9 * 160
    assert placement.kv_bytes_per_sequence("tiny", 5) == 2 * 5 * 80 + 4 * 5 * 160


def test_memory_and_sync_follow_from_the_assumptions(capsys):
    out = placement.main(["--trainer-gpus", "64", "--pp", "4", "--ep", "16", "--servers", "2"])
    n = placement.parameters("mimo_v2_flash")
    # Experts: 1/(pp x ep) per GPU, no expert-data parallelism, 18 bytes each; the rest 1/pp, 6 + 12/16 bytes.
    want = (n["experts"] / 64 * 18 + (n["dense"] + n["mtp"]) / 4 * (6 + 12 / 16)) / 1e9
    assert out["trainer"]["weights_grads_optimizer_gb_per_gpu"] == round(want, 1)
    weights = n["total"] * 2 / 1e9
    assert out["weight_sync"]["bytes_per_step_gb"]["every_worker_gets_all"] == round(weights * 16)
    assert out["weight_sync"]["seconds_at_line_rate"]["every_worker_gets_all"] == round(weights / 50, 1)  # 400 Gb/s
    assert '"nodes_total": 13.0' in capsys.readouterr().out  # 8 trainer + 2 rollout + 3 teacher nodes

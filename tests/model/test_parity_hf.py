"""Our megatron-core model computes the same logits as transformers' MiMoV2FlashForCausalLM."""

import pytest
import torch

import mimo_train
from tests.model.hf_utils import hf_model, load_transformers, random_config, write_serving_dir

SEQ = 32
TOL = 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logits_match_transformers_save_pretrained(tmp_path, megatron_single, seed):
    """transformers writes a checkpoint with save_pretrained; load_hf reads it; logits agree."""
    cfg = random_config(seed)
    assert cfg.hybrid_layer_pattern.count(0) >= 2 and cfg.hybrid_layer_pattern.count(1) >= 3
    assert cfg.sliding_window_size < SEQ // 2 and cfg.n_routed_experts >= 4 and cfg.num_experts_per_tok >= 2
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ))
    with torch.no_grad():
        expected = ref(ids).logits

    ours = mimo_train.load_hf(tmp_path)
    logits = ours(ids)
    assert logits.shape == (2, SEQ, cfg.vocab_size)
    assert (logits - expected).abs().max().item() <= TOL


def test_expert_bias_changes_the_choice_and_is_honoured(tmp_path, megatron_single):
    """With the bias zeroed the reference's logits move a lot: the bias decides routing, and
    our model follows it (the parity above would fail if it were ignored)."""
    cfg = random_config(3)
    ref = hf_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ))
    with torch.no_grad():
        with_bias = ref(ids).logits
        for name, b in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        without_bias = ref(ids).logits
    assert (with_bias - without_bias).abs().max().item() > 100 * TOL
    ref.save_pretrained(tmp_path)
    assert (mimo_train.load_hf(tmp_path)(ids) - without_bias).abs().max().item() <= TOL


def test_our_weights_and_config_load_in_transformers(tmp_path, megatron_single):
    """The reverse direction: our model's weights under serving names and our config.json
    (hub field names + transformers' names) load in transformers with the same logits."""
    cfg = random_config(4)
    src = hf_model(cfg)
    src.save_pretrained(tmp_path / "a")
    ours = mimo_train.load_hf(tmp_path / "a")
    with torch.no_grad():  # make our weights differ from the source, then export them
        for p in ours.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    write_serving_dir(tmp_path, cfg, ours.hf_state_dict())
    theirs = load_transformers(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max().item() <= TOL

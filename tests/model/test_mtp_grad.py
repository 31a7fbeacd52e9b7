"""The MTP loss trains what it should: one SGD step on a loss of the MTP logits, from the same
weights, leaves our model and the independent reference chain (tests/model/test_mtp.py, on
transformers' main model) computing the same main and MTP logits. The trunk, embedding and
lm_head get the MTP loss's gradient too, so a wrong gradient into the trunk shows in the
main logits after the step."""

import torch
from safetensors.torch import load_file

import mimo_train
from tests.model.hf_utils import hf_model, random_config, sgd_step, write_serving_dir
from tests.model.test_mtp import SEQ, random_mtp_weights, reference_mtp_logits

LR, TOL = 0.02, 1e-4


def test_one_sgd_step_on_the_mtp_loss_matches_the_reference(tmp_path, megatron_single):
    depth = 2
    cfg = random_config(20, mtp=depth)
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    weights = {**load_file(str(tmp_path / "hf" / "model.safetensors")), **random_mtp_weights(cfg)}
    write_serving_dir(tmp_path, cfg, weights)
    ours = mimo_train.load_hf(tmp_path)
    ours.model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=gen)
    directions = [torch.randn(2, SEQ, cfg.vocab_size, generator=gen) for _ in range(depth)]
    mtp_weights = {k: v.clone().requires_grad_() for k, v in weights.items() if k.startswith("model.mtp.")}

    with torch.no_grad():
        main_before = hf(ids).logits

    def loss(mtp_logits):
        return sum((logits * d).sum() for logits, d in zip(mtp_logits, directions))

    reference = reference_mtp_logits(hf, mtp_weights, cfg, ids, grad=True)
    sgd_step([*hf.parameters(), *mtp_weights.values()], loss(reference), LR)
    sgd_step(ours.model.parameters(), loss(ours.model(ids).logits[1:]), LR)

    with torch.no_grad():
        expected = [hf(ids).logits, *reference_mtp_logits(hf, mtp_weights, cfg, ids)]
    got = ours.all_logits(ids)
    assert (expected[0] - main_before).abs().max().item() > 100 * TOL  # the MTP loss moved the trunk
    for k, (g, e) in enumerate(zip(got, expected)):
        err = (g - e).abs().max().item()
        assert err <= TOL * max(1.0, e.abs().max().item()), f"depth {k}: {err}"

"""The two model switches RL training uses: MTP depths trained without moving the trunk, and
the main depth's log-probs taken at the sampling temperature."""

import torch
import torch.nn.functional as F

from mimo_train.model.config import ModelConfig
from mimo_train.model.gpt import build_model


def _model_and_batch():
    cfg = ModelConfig.preset("tiny")
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, 24))
    labels = torch.randint(0, cfg.vocab_size, (1, 24))
    return model, tokens, labels


def _grads_from_mtp_losses(model, tokens, labels) -> dict[str, bool]:
    model.zero_grad(set_to_none=True)
    out = model(tokens, labels=labels)
    sum(loss.sum() for loss in out.losses[1:]).backward()
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}


def test_detached_mtp_losses_reach_only_the_mtp_layers(megatron_single):
    model, tokens, labels = _model_and_batch()
    model.detach_mtp = True
    got = _grads_from_mtp_losses(model, tokens, labels)
    moved = sorted(n for n, g in got.items() if g)
    assert moved and all(n.startswith("mtp.") for n in moved), moved
    # Without the switch the same losses train the trunk, the embedding and the output layer.
    model.detach_mtp = False
    got = _grads_from_mtp_losses(model, tokens, labels)
    assert got["embedding.word_embeddings.weight"] and got["output_layer.weight"]
    assert any(g for n, g in got.items() if n.startswith("decoder."))


def test_detaching_does_not_change_any_loss(megatron_single):
    model, tokens, labels = _model_and_batch()
    plain = model(tokens, labels=labels)
    model.detach_mtp = True
    detached = model(tokens, labels=labels)
    for a, b in zip(plain.losses, detached.losses):
        assert torch.equal(a, b)


def test_main_losses_at_a_temperature_are_the_tempered_log_probs(megatron_single):
    model, tokens, labels = _model_and_batch()
    logits = model(tokens).logits[0]  # [1, s, v]
    model.logit_temperature = 0.7
    out = model(tokens, labels=labels)
    expected = -F.log_softmax(logits.float() / 0.7, -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(-out.losses[0], -expected, rtol=1e-5, atol=1e-5)
    # MTP depths keep temperature 1: they are trained as drafts, not scored as the policy.
    model.logit_temperature = 1.0
    assert torch.equal(model(tokens, labels=labels).losses[1], out.losses[1])

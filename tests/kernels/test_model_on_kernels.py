"""The training model runs on the Triton attention kernels: one forward and backward of a
tiny MiMo-V2-Flash (global and sliding-window layers with sinks, GQA, dk != dv, an MTP depth)
gives the reference path's loss and every parameter gradient, sinks included. Through the
dispatcher, as training calls it (MIMO_ATTENTION_BACKEND forces the kernels on CPU)."""

import torch

from tests.kernels.attention_utils import rel_err, triton_device

DEVICE = triton_device(module_level=True)  # or skip this module: see test_triton_interpreted.py


def test_tiny_model_gradients_match_reference(megatron_single, monkeypatch):
    from mimo_train.model.config import ModelConfig
    from mimo_train.model.gpt import build_model

    # 3 SWA layers and 1 MTP depth are enough here; the interpreter's time goes per layer
    cfg = ModelConfig.preset("tiny", sliding_window_size=5, num_hidden_layers=4, hybrid_layer_pattern=[0, 1, 1, 1],
                             moe_layer_freq=[0, 1, 1, 1], num_nextn_predict_layers=1)
    model = build_model(cfg).to(DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (1, 17), device=DEVICE)

    def loss_and_grads(backend):
        monkeypatch.setenv("MIMO_ATTENTION_BACKEND", backend)
        model.zero_grad()
        loss = sum((logits.float() ** 2).mean() for logits in model(ids).logits)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = loss_and_grads("reference")
    loss, grads = loss_and_grads("triton")
    assert any("sinks" in name for name in grads) and grads.keys() == ref_grads.keys()
    assert rel_err(loss, ref_loss) <= 1e-5
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) <= 1e-4, name

"""parallel.recompute=selective recomputes our attention's core in backward: the gradients are
those of a run that keeps every activation, and the attention scores are not kept."""

import math
from collections import Counter

import torch

from mimo_train.model.attention import MiMoAttention
from mimo_train.model.config import ModelConfig
from mimo_train.model.gpt import build_model
from mimo_train.model.spec import MegatronOptions

SEQ = 48


def model_with(recompute, weights=None):
    cfg = ModelConfig.preset("tiny", num_key_value_heads=2)
    model = build_model(cfg, MegatronOptions(recompute=recompute))
    if weights is not None:
        model.load_state_dict(weights)
    model.train()
    return cfg, model


def loss_and_saved(model, tokens):
    """The loss (summed over depths and tokens), and the shapes of the tensors autograd keeps."""
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens, labels=torch.roll(tokens, -1, 1), loss_mask=torch.ones_like(tokens, dtype=torch.float))
        loss = sum(l.sum() for l in out.losses)
    return loss, saved


def test_selective_recompute_same_gradients_fewer_activations(megatron_single):
    torch.manual_seed(0)
    cfg, plain = model_with(None)
    _, selective = model_with("selective", plain.state_dict())
    assert all(m.recompute_core_attention for m in selective.modules() if isinstance(m, MiMoAttention))
    tokens = torch.randint(0, cfg.vocab_size, (1, SEQ))

    results = []
    for model in (plain, selective):
        loss, saved = loss_and_saved(model, tokens)
        loss.backward()
        results.append((loss.detach(), saved, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_p, saved_p, grads_p), (loss_s, saved_s, grads_s) = results

    assert torch.equal(loss_p, loss_s)
    assert grads_p.keys() == grads_s.keys() and any(n.endswith("sinks") for n in grads_s)
    for name in grads_p:
        torch.testing.assert_close(grads_s[name], grads_p[name], rtol=0, atol=1e-6, msg=name)
    # Without recompute every attention layer (main layers and MTP layers) keeps its query x key
    # scores/probabilities; with it none, and in their place each layer keeps the core
    # attention's inputs (q, k, v, positions), which the recompute starts from.
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    assert len([s for s in saved_p if is_scores(s)]) >= layers
    assert not [s for s in saved_s if is_scores(s)]
    kept_instead = Counter(saved_s) - Counter(saved_p)
    assert sum(kept_instead.values()) == 4 * layers
    assert numel(saved_s) < numel(saved_p) - layers * cfg.num_attention_heads * SEQ * SEQ


def is_scores(shape) -> bool:
    """[..., queries, keys] (keys + 1 with the sink column)."""
    return len(shape) >= 3 and shape[-2] == SEQ and shape[-1] in (SEQ, SEQ + 1)


def numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def test_recompute_only_while_training(megatron_single):
    torch.manual_seed(0)
    cfg, model = model_with("selective")
    model.eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, SEQ))
    _, saved_eval = loss_and_saved(model, tokens)
    assert any(is_scores(s) for s in saved_eval)  # eval: the plain path

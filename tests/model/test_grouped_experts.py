"""Our routed experts (GroupedExperts: two grouped matmuls over the stacked local weights) compute
what megatron-core's SequentialMLP computes with its loop over the same experts' MLPs: the same
outputs and the same gradients for the tokens, the router's probabilities and every expert's
weights, with an expert that receives no token among them. The model's parity with transformers
(test_parity_hf.py, test_grad_parity_hf.py) and the parallel layouts' parity with one process run
through these experts too."""

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from mimo_train.model.config import ModelConfig
from mimo_train.model.experts import GroupedExperts
from mimo_train.model.gpt import build_model


def _moe_experts():
    model = build_model(ModelConfig.preset("tiny", num_nextn_predict_layers=0))
    experts = model.decoder.layers[1].mlp.experts
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # weights of order one (not the init's 0.02), so outputs are too
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return experts


def _run(experts, forward, tokens, tokens_per_expert, probs, grad):
    tokens = tokens.clone().requires_grad_()
    probs = probs.clone().requires_grad_()
    experts.zero_grad(set_to_none=True)
    out, bias = forward(experts, tokens, tokens_per_expert, probs)
    out.backward(grad)
    weights = {name: p.grad.clone() for name, p in experts.named_parameters()}
    return out.detach(), tokens.grad, probs.grad, weights, bias


def test_grouped_experts_compute_megatrons_loop(megatron_single):
    experts = _moe_experts()
    assert isinstance(experts, GroupedExperts) and experts.num_local_experts == 8
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 9, 1, 7, 3, 0, 11])  # two experts receive nothing
    tokens = torch.randn(int(counts.sum()), 64, generator=gen)
    probs = torch.rand(int(counts.sum()), generator=gen)
    grad = torch.randn(int(counts.sum()), 64, generator=gen)

    calls = []
    hooks = [e.linear_fc1.register_forward_hook(lambda *a: calls.append(1)) for e in experts.local_experts]
    grouped = _run(experts, GroupedExperts.forward, tokens, counts, probs, grad)
    assert not calls  # the grouped path does not go through the per-expert linear layers
    loop = _run(experts, SequentialMLP.forward, tokens, counts, probs, grad)
    assert len(calls) == 8  # megatron's loop does, once per expert
    for h in hooks:
        h.remove()

    out, d_tokens, d_probs, d_weights, bias = grouped
    ref_out, ref_tokens, ref_probs, ref_weights, _ = loop
    assert bias is None
    # Measured: bit-equal on this CPU (each expert's rows go through the same matmul kernel).
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=0)
    torch.testing.assert_close(d_tokens, ref_tokens, rtol=1e-6, atol=0)
    torch.testing.assert_close(d_probs, ref_probs, rtol=1e-6, atol=0)
    assert d_weights.keys() == ref_weights.keys() and len(d_weights) == 16
    for name in ref_weights:
        torch.testing.assert_close(d_weights[name], ref_weights[name], rtol=1e-6, atol=0)
    assert d_weights["local_experts.1.linear_fc1.weight"].abs().max() == 0  # no token, no gradient
    assert ref_out.abs().max() > 1  # the control: the outputs compared are not vanishing


def test_a_wrong_expert_offset_is_seen(megatron_single):
    """The control for the comparison above: the same tokens with one token moved to the next
    expert give a different result, so a grouping that mixed experts up could not pass."""
    experts = _moe_experts()
    gen = torch.Generator().manual_seed(1)
    counts = torch.tensor([5, 2, 9, 1, 7, 3, 4, 11])
    tokens = torch.randn(int(counts.sum()), 64, generator=gen)
    probs = torch.rand(int(counts.sum()), generator=gen)
    with torch.no_grad():
        right = experts(tokens, counts, probs)[0]
        shifted = experts(tokens, counts + torch.tensor([-1, 1, 0, 0, 0, 0, 0, 0]), probs)[0]
    assert (right[4] - shifted[4]).abs().max() > 1e-3
    torch.testing.assert_close(right[:4], shifted[:4], rtol=0, atol=0)


def test_one_rank_moe_uses_the_all_gather_dispatcher_with_the_all_to_alls_result(megatron_single):
    """Without expert or tensor parallelism the MoE layer takes megatron's all-gather dispatcher
    (it only permutes); its outputs and gradients are the all-to-all dispatcher's, bit for bit."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

    from mimo_train.model.spec import MegatronOptions

    cfg = ModelConfig.preset("tiny", num_nextn_predict_layers=0)
    layers = {}
    for dispatcher in (None, "alltoall"):
        torch.manual_seed(0)
        layers[dispatcher] = build_model(cfg, MegatronOptions(moe_dispatcher=dispatcher)).decoder.layers[1].mlp
    assert isinstance(layers[None].token_dispatcher, MoEAllGatherTokenDispatcher)
    assert not isinstance(layers["alltoall"].token_dispatcher, MoEAllGatherTokenDispatcher)
    gen = torch.Generator().manual_seed(0)
    x, grad = torch.randn(40, 1, 64, generator=gen), torch.randn(40, 1, 64, generator=gen)
    results = []
    for layer in layers.values():
        xi = x.clone().requires_grad_()
        out = layer(xi)[0]
        out.backward(grad)
        results.append([out.detach(), xi.grad, *[p.grad.clone() for p in layer.parameters()]])
    assert len(results[0]) == len(results[1]) > 3
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_weights_stacked_once_per_step_give_the_gradients_of_stacking_each_micro_batch(megatron_single):
    """Within stacked_weights_reused (a step's micro-batches) the experts stack their weights once;
    three micro-batches' accumulated gradients equal those of stacking every time, bit for bit,
    and a copy made before the weights changed is not used after the block."""
    from mimo_train.model.experts import stacked_weights_reused

    experts = _moe_experts()
    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([5, 0, 9, 1, 7, 3, 0, 11])
    batches = [(torch.randn(36, 64, generator=gen), torch.rand(36, generator=gen), torch.randn(36, 64, generator=gen))
               for _ in range(3)]

    def accumulate():
        experts.zero_grad(set_to_none=True)
        outs = []
        for tokens, probs, grad in batches:
            out = experts(tokens, counts, probs)[0]
            out.backward(grad)
            outs.append(out.detach())
        return outs, {n: p.grad.clone() for n, p in experts.named_parameters()}

    plain_outs, plain_grads = accumulate()
    with stacked_weights_reused([experts]):
        reused_outs, reused_grads = accumulate()
        assert set(experts._stacks) == {"fc1", "fc2"}
    assert experts._stacks is None
    assert all(torch.equal(a, b) for a, b in zip(plain_outs, reused_outs))
    assert all(torch.equal(plain_grads[n], reused_grads[n]) for n in plain_grads)
    with torch.no_grad():  # the weights change between blocks: the next block stacks them anew
        experts.local_experts[2].linear_fc1.weight.mul_(2)
    with stacked_weights_reused([experts]):
        changed = experts(*batches[0][:1], counts, batches[0][1])[0]
    assert not torch.equal(changed, plain_outs[0])

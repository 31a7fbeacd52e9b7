"""The CPU compatibility layer: each patch does what megatron-core needs, and nothing happens
on a machine with CUDA."""

import subprocess
import sys

import numpy as np
import torch

from mimo_train.model import compat


def test_applies_only_without_cuda():
    """With CUDA nothing of torch is patched; megatron's MoE gating still works without
    Transformer Engine (its missing `te_general_gemm` name is defined as None on any device)."""
    code = ("import torch; torch.cuda.is_available = lambda: True; before = torch.cuda.current_device; "
            "from megatron.core.transformer.moe import moe_utils; assert not hasattr(moe_utils, 'te_general_gemm'); "
            "from mimo_train.model import compat; assert compat.apply() is False; "
            "assert torch.cuda.current_device is before; assert moe_utils.te_general_gemm is None; print('untouched')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "untouched" in out.stdout


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_megatron_compiled_helpers_are_eager_only_without_cuda():
    """Without CUDA, megatron's `jit_fuser` helpers (the router's expert-bias bookkeeping runs
    every MoE step) are plain functions and Dynamo is not even imported; with CUDA they stay
    `torch.compile`d (mimo_train/model/megatron_jit.py)."""
    probe = ("import sys, mimo_train; from megatron.core.transformer.moe.router import TopKRouter; "
             "from mimo_train.model import megatron_jit; "
             "print(megatron_jit.eager(), hasattr(TopKRouter._apply_expert_bias, '_torchdynamo_orig_callable'), "
             "'torch._dynamo' in sys.modules)")
    assert _python(probe).split() == ["True", "False", "False"]
    assert _python("import torch; torch.cuda.is_available = lambda: True; " + probe).split() == ["False", "True", "True"]


def test_tensor_placement_goes_to_cpu(megatron_single):
    assert compat.apply() or compat._APPLIED
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    torch.cuda.synchronize()  # a no-op, not an error


def test_rng_tracker_forks_a_separate_generator(megatron_single):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(7)
    tracker = get_cuda_rng_tracker()
    cpu_before = torch.get_rng_state()
    states = tracker.get_states()
    name = "model-parallel-rng"
    saved = states[name].clone()
    with tracker.fork():
        state_inside = torch.cuda.get_rng_state()
    assert torch.equal(state_inside, saved)  # the fork switched to the tracked state
    assert torch.equal(torch.get_rng_state(), cpu_before)  # the global CPU RNG is untouched
    # Seeding again reproduces the same tracked states: checkpointable and deterministic.
    model_parallel_cuda_manual_seed(7)
    assert torch.equal(get_cuda_rng_tracker().get_states()[name], saved)


def test_router_has_no_transformer_engine_gemm(megatron_single):
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None


def test_all_to_all_split_sizes_become_lists(monkeypatch, megatron_single):
    from megatron.core.tensor_parallel import mappings

    seen = {}

    def fake_all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None):
        seen["types"] = (type(output_split_sizes), type(input_split_sizes))
        output.copy_(input)

    class TwoRanks:
        def size(self):
            return 2

    monkeypatch.setattr(torch.distributed, "all_to_all_single", fake_all_to_all_single)

    class Ctx:
        pass

    x = torch.arange(4.0).view(4, 1)
    out = mappings._AllToAll.forward(Ctx(), TwoRanks(), x, np.array([2, 2]), np.array([2, 2]))
    assert seen["types"] == (list, list)
    assert torch.equal(out, x)


def test_foreach_stand_ins_compute_megatrons_multi_tensor_fallbacks(megatron_single):
    """The gradient norm and gradient scaling that megatron's optimizer calls without Apex/TE:
    our foreach versions give the same values as megatron's own per-tensor stand-ins, bit for bit."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    compat.apply()
    compat.foreach_multi_tensor_fallbacks()
    assert clip_grads.l2_norm_impl is not utils.local_multi_tensor_l2_norm
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen) for shape in [(48, 64), (16,), (5, 7, 3), (1,)] * 20]
    ours, _ = clip_grads.l2_norm_impl(0, None, [grads], False)
    theirs, _ = utils.local_multi_tensor_l2_norm(0, None, [grads], False)
    assert torch.equal(ours, theirs) and ours.shape == (1,)
    for same in (True, False):  # scaling in place (clip_grads) and into other tensors
        a = [g.clone() for g in grads]
        b = [g.clone() for g in grads]
        out_a = a if same else [torch.empty_like(g) for g in grads]
        out_b = b if same else [torch.empty_like(g) for g in grads]
        clip_grads.multi_tensor_scale_impl(0, None, [a, out_a], 0.37)
        utils.local_multi_tensor_scale(0, None, [b, out_b], 0.37)
        assert all(torch.equal(x, y) for x, y in zip(out_a, out_b))
        assert not torch.equal(out_a[0], grads[0])  # the control: something was scaled

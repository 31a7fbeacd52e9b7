"""GPU lane: our megatron-core model on CUDA computes transformers' logits (the reference runs
in fp32 on the CPU): to fp32 rounding in fp32, and to bf16 rounding in bf16, the dtype runs use
on a GPU by default."""

import pytest
import torch

import mimo_train
from tests.gpu.conftest import rel_error
from tests.model.hf_utils import hf_model, random_config

pytestmark = pytest.mark.gpu
SEQ = 32
FP32_TOL = 1e-4     # max abs, as the CPU parity test
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op); through 5-7 layers of
# residual sums and MoE mixing the logits' relative error stays within ~1e-2.
BF16_REL_TOL = 2e-2


@pytest.fixture(scope="module", params=[0, 1])
def case(request, tmp_path_factory):
    torch.manual_seed(request.param)
    cfg = random_config(request.param)
    ref = hf_model(cfg)
    path = tmp_path_factory.mktemp(f"hf{request.param}")
    ref.save_pretrained(path)
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(request.param))
    with torch.no_grad():
        expected = ref(ids).logits
    return path, ids, expected, ref


def test_fp32_on_cuda_matches_transformers(case, megatron_single):
    path, ids, expected, _ = case
    ours = mimo_train.load_hf(path, device="cuda", dtype=torch.float32)
    with torch.no_grad():
        logits = ours(ids.cuda())
    assert logits.device.type == "cuda" and logits.dtype == torch.float32
    err = (logits.cpu() - expected).abs().max().item()
    print(f"fp32 cuda vs transformers cpu: max abs {err:.2e}")
    assert err <= FP32_TOL


def test_bf16_on_cuda_matches_transformers_to_bf16_rounding(case, megatron_single):
    path, ids, expected, ref = case
    ours = mimo_train.load_hf(path)  # a GPU's defaults: cuda, bf16
    with torch.no_grad():
        logits = ours(ids.cuda())
    assert logits.device.type == "cuda" and logits.dtype == torch.bfloat16
    err = rel_error(logits, expected)
    print(f"bf16 cuda vs fp32 transformers: relative L2 {err:.2e}")
    assert err <= BF16_REL_TOL
    # The tolerance tells models apart: without the expert bias (another routing) the
    # reference's own logits are much further off than bf16 takes ours.
    with torch.no_grad():
        for name, b in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        other = ref(ids).logits
    assert rel_error(other, expected) > 3 * BF16_REL_TOL

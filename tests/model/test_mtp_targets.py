"""What each MTP depth is trained on: depth k's loss at position t is the cross-entropy of its
logits against token t+1+k, its loss mask is the caller's shifted k places left (zero past the
end), and its logits at t see tokens 0..t+k and nothing later.

This is what an ideal predictor of a task is measured against (tools/bench_rollout.py's periodic
copy task: depth k's masked targets all have their copy one period back in sight), so a depth
that stays at chance there is a training matter, not a mis-aligned target or a hidden token.
"""

import pytest
import torch
import torch.nn.functional as F

from mimo_train.model.config import ModelConfig
from mimo_train.model.gpt import build_model

SEQ = 20


@pytest.fixture(scope="module")
def model(megatron_single):
    torch.manual_seed(0)
    return build_model(ModelConfig.preset("tiny")).eval()


def test_depth_k_is_scored_against_token_t_plus_1_plus_k_under_the_mask_shifted_k(model):
    ids = torch.randint(3, 40, (2, SEQ), generator=torch.Generator().manual_seed(0))
    labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    mask = torch.zeros(2, SEQ)
    mask[:, 5:-1] = 1
    mask[1, 9] = 0  # a hole, to see it move with the depth
    with torch.no_grad():
        logits = model(ids).logits
        out = model(ids, labels=labels, loss_mask=mask)
    assert len(out.losses) == len(out.loss_masks) == len(out.correct) == 4
    for k in range(4):
        n = SEQ - 1 - k  # positions whose target t+1+k lies inside the sequence
        expected = F.cross_entropy(logits[k][:, :n].flatten(0, 1), ids[:, 1 + k:].flatten(), reduction="none")
        assert torch.allclose(out.losses[k][:, :n], expected.view(2, n), atol=1e-5), f"depth {k} loss"
        assert torch.equal(out.correct[k][:, :n], logits[k][:, :n].argmax(-1) == ids[:, 1 + k:]), f"depth {k} hits"
        shifted = torch.zeros_like(mask)
        shifted[:, :SEQ - k] = mask[:, k:]
        assert torch.equal(out.loss_masks[k], shifted), f"depth {k} mask"


def test_depth_k_logits_at_t_see_tokens_up_to_t_plus_k(model):
    ids = torch.randint(3, 40, (1, SEQ), generator=torch.Generator().manual_seed(1))
    t = 10
    with torch.no_grad():
        base = model(ids).logits
        seen = {k: [] for k in range(4)}
        for j in range(SEQ):
            changed = ids.clone()
            changed[0, j] = 3 + (int(ids[0, j]) - 3 + 7) % 37
            for k, lg in enumerate(model(changed).logits):
                if (lg[0, t] - base[k][0, t]).abs().max() > 1e-6:
                    seen[k].append(j)
    for k in range(4):
        assert seen[k] == list(range(t + k + 1)), f"depth {k} at t={t} depends on tokens {seen[k]}"

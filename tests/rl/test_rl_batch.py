"""Rollout samples -> packed training rows: every per-token value sits at the position that
predicts its token, and padding is inert."""

import torch

from mimo_train.rl.batch import Sample, micro_batches, padded_length


def _samples():
    a = Sample(prompt=[1, 10, 11], response=[20, 21, 2], rollout_logprobs=[-0.1, -0.2, -0.3], domain="x",
               outcome_advantage=0.5, teacher_logprobs=[-1.0, -2.0, -3.0],
               routed=torch.arange(5 * 2 * 2).view(5, 2, 2) % 7)
    b = Sample(prompt=[1, 12], response=[22], rollout_logprobs=[-0.4], domain="y", outcome_advantage=-1.0,
               teacher_logprobs=[-4.0], routed=torch.zeros(2, 2, 2, dtype=torch.long))
    return [a, b]


def test_values_sit_at_the_positions_that_predict_their_tokens():
    samples = _samples()
    length = padded_length(samples, micro_batch=2, multiple=4)
    assert length == 8  # 5 + 2 positions, rounded up to a multiple of 4
    [mb] = micro_batches(samples, 2, num_sequences=2, length=length, num_experts=7)
    row = {k: v[0] for k, v in mb.items() if isinstance(v, torch.Tensor) and v.dim() > 1}
    assert row["tokens"].tolist() == [1, 10, 11, 20, 21, 1, 12, 0]
    assert row["labels"].tolist() == [10, 11, 20, 21, 2, 12, 22, 0]
    assert row["loss_mask"].tolist() == [0, 0, 1, 1, 1, 0, 1, 0]
    f32 = lambda values: torch.tensor(values, dtype=torch.float32)  # noqa: E731
    assert torch.equal(row["rollout_logprobs"], f32([0, 0, -0.1, -0.2, -0.3, 0, -0.4, 0]))
    assert torch.equal(row["teacher_logprobs"], f32([0, 0, -1, -2, -3, 0, -4, 0]))
    assert torch.equal(row["outcome"], f32([0, 0, 0.5, 0.5, 0.5, 0, -1, 0]))
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 0]
    # Mean over each response, then over the 2 sequences of the global batch.
    torch.testing.assert_close(row["token_weight"], torch.tensor([0, 0, 1 / 6, 1 / 6, 1 / 6, 0, 1 / 2, 0]))
    assert mb["cu_seqlens"].tolist() == [0, 5, 7, 8] and mb["max_seqlen"] == 5


def test_padding_replays_experts_round_robin_and_is_marked_invalid():
    samples = _samples()
    [mb] = micro_batches(samples, 2, num_sequences=2, length=12, num_experts=7)
    routed, valid = mb["routed"][0], mb["routed_valid"][0]
    assert torch.equal(routed[:5], samples[0].routed) and torch.equal(routed[5:7], samples[1].routed)
    assert valid.tolist() == [True] * 7 + [False] * 5
    filler = routed[7:, 0].reshape(-1).tolist()  # 5 padding tokens x top-2
    assert filler == [i % 7 for i in range(10)]
    assert routed[7:, 0].tolist() == routed[7:, 1].tolist()  # every MoE layer alike


def test_the_teachers_top_k_and_the_domain_sit_with_their_positions():
    samples = _samples()
    samples[0].teacher_top_ids = torch.tensor([[20, 5], [21, 6], [2, 7]])
    samples[0].teacher_top_logprobs = torch.tensor([[-0.5, -1.5], [-0.6, -1.6], [-0.7, -1.7]])
    samples[1].teacher_top_ids, samples[1].teacher_top_logprobs = torch.tensor([[22, 9]]), torch.tensor([[-0.8, -1.8]])
    [mb] = micro_batches(samples, 2, num_sequences=2, length=8, num_experts=7, domains=["y", "x"])
    ids, lps = mb["teacher_top_ids"][0], mb["teacher_top_logprobs"][0]
    assert ids.shape == lps.shape == (8, 2)
    assert ids.tolist() == [[0, 0], [0, 0], [20, 5], [21, 6], [2, 7], [0, 0], [22, 9], [0, 0]]
    assert torch.equal(lps[2:5], samples[0].teacher_top_logprobs) and torch.equal(lps[6], samples[1].teacher_top_logprobs[0])
    assert lps[:2].abs().sum() == 0 and lps[5].abs().sum() == 0 and lps[7].abs().sum() == 0
    assert mb["domain"][0].tolist() == [-1, -1, 1, 1, 1, -1, 0, -1]  # response tokens only; padding -1

"""kernels/sampling.py: the tensor contract of `speculative_verify` and of the filters, and the
rejection rule checked directly on fixed distributions (one vectorised call, many rows)."""

import pytest
import torch
from scipy.stats import chisquare

from mimo_train.kernels.sampling import draw, filter_logits, probabilities, sample, speculative_verify


def test_top_k_then_top_p():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    keep = lambda k, p: (filter_logits(logits, k, p) > float("-inf")).nonzero()[:, 1].tolist()  # noqa: E731
    assert keep(torch.tensor([2]), None) == [1, 3]
    assert keep(None, torch.tensor([0.5])) == [1, 3]  # 0.4 < 0.5, then 0.3 reaches it
    assert keep(None, torch.tensor([0.4])) == [1]
    assert keep(None, torch.tensor([1.0])) == [0, 1, 2, 3, 4]
    assert keep(torch.tensor([3]), torch.tensor([0.8])) == [1, 3]  # top-p on the top-3, renormalised (not [1, 3, 4])
    assert keep(torch.tensor([0]), torch.tensor([1.0])) == [0, 1, 2, 3, 4]  # both off
    rows = filter_logits(logits.expand(2, 5), torch.tensor([1, 0]), torch.tensor([1.0, 0.5]))
    assert (rows > float("-inf")).sum(-1).tolist() == [1, 2]  # per-row parameters


def test_draw_never_returns_a_token_without_mass():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(4, 5)
    u = torch.tensor([0.0, 0.5, 0.999999, 1 - 2 ** -24])
    assert draw(probs, u).tolist() == [1, 3, 3, 3]
    assert sample(torch.randn(3, 7), torch.zeros(3), None, None, torch.rand(3))[1].sum(-1).allclose(torch.ones(3))


def test_contract_shapes_padding_and_greedy_path():
    torch.manual_seed(0)
    batch, k, vocab = 64, 3, 5
    logits = torch.randn(batch, k + 1, vocab) * 3
    drafts = torch.randint(0, vocab, (batch, k))
    drafts[:8] = logits[:8, :k].argmax(-1)  # some rows draft exactly the target's choices
    one_hot = torch.nn.functional.one_hot(drafts, vocab).float()
    temp = torch.zeros(batch)
    u = torch.rand(batch, k + 1)
    general = speculative_verify(logits, drafts, one_hot, temp, None, None, u)
    fast = speculative_verify(logits, drafts, None, temp, None, None, u, greedy=True)
    for a, b in zip(general, fast):
        assert torch.equal(a, b)
    n_acc, tokens, logprobs = general
    assert n_acc[:8].tolist() == [k] * 8  # drafts equal to the argmax are all kept, plus a bonus
    assert tokens.shape == logprobs.shape == (batch, k + 1) and tokens.dtype == torch.long
    j = torch.arange(k + 1)
    assert ((tokens == -1) == (j > n_acc[:, None])).all() and (logprobs[tokens == -1] == 0).all()
    best = logits.argmax(-1)
    assert (tokens[j <= n_acc[:, None]] == best[j <= n_acc[:, None]]).all()
    expected = logits.log_softmax(-1).gather(-1, tokens.clamp(min=0)[..., None]).squeeze(-1)
    assert torch.allclose(logprobs[tokens >= 0], expected[tokens >= 0])
    # K = 0: one token per row, drawn from p with the row's one uniform.
    t = torch.full((batch,), 0.7)
    n0, tok0, _ = speculative_verify(logits[:, :1], drafts[:, :0], None, t, None, None, u[:, :1])
    assert n0.eq(0).all() and torch.equal(tok0[:, 0], draw(probabilities(logits[:, 0], t), u[:, 0]))


@pytest.mark.parametrize("position", [0, 1])
def test_rejection_sampling_recovers_the_target(position):
    """Fixed p (target) and q (draft) per position, 200k rows: the token emitted at `position`,
    given every earlier draft was accepted, follows p exactly; and drafts are accepted at the
    rate sum(min(p, q))."""
    gen = torch.Generator().manual_seed(position)
    rows, vocab, k = 200_000, 6, 2
    target = torch.randn(k + 1, vocab, generator=gen) * 1.5
    q = torch.softmax(torch.randn(k, vocab, generator=gen) * 1.5, -1)
    drafts = torch.multinomial(q, rows, replacement=True, generator=gen).T  # [rows, k]
    u = torch.rand(rows, k + 1, generator=gen)
    n_acc, tokens, _ = speculative_verify(target.expand(rows, -1, -1), drafts, q.expand(rows, -1, -1),
                                          torch.ones(rows), None, None, u)
    p = target.softmax(-1)
    assert abs((n_acc >= 1).float().mean() - torch.minimum(p[0], q[0]).sum()) < 0.005
    reached = n_acc >= position
    counts = torch.bincount(tokens[reached, position], minlength=vocab).double()
    expected = p[position].double() / p[position].double().sum() * counts.sum()
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3

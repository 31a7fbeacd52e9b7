"""The Triton speculative verification kernels (kernels/triton_sampling.py) equal the reference
of kernels/sampling.py on the same inputs and uniforms: identical n_accepted and tokens, log-
probs to 1e-5, over random small shapes (vocabularies not a multiple of the block, K = 0..3,
greedy and sampled rows mixed, top-k / top-p per row, bf16 logits, masked vocabulary entries).
They are lossless: with K = 3, the token emitted at each position follows the target (chi-
square), at a sample size with which a wrong acceptance rule or a missing residual fails. And
`speculative_verify` dispatches to them when asked (argument or MIMO_SAMPLING_BACKEND).

Inputs are continuous random values: no ties at a top-k / top-p threshold, where the kernel
may keep a different set (see kernels/triton_sampling.py)."""

import random

import pytest
import torch
from scipy.stats import chisquare

from mimo_train.kernels import sampling
from mimo_train.kernels.sampling import (greedy_verify_reference, probabilities, sample, speculative_verify,
                                         speculative_verify_reference)
from tests.kernels.attention_utils import triton_device

DEVICE = triton_device(module_level=True)  # or skip this module: see test_triton_interpreted.py

from mimo_train.kernels import triton_sampling  # noqa: E402
from mimo_train.kernels.triton_sampling import probabilities_triton, speculative_verify_triton  # noqa: E402

BLOCK_V = 32  # small vocabularies still span several blocks, the last one partial


def test_filtering_matches_the_reference():
    """The target distribution the kernels filter in-kernel (threshold search, no sort): the
    kept set exactly and the probabilities to 1e-6, per row temperature (greedy rows one-hot),
    top-k and top-p together and alone, over many rows."""
    gen = torch.Generator().manual_seed(7)
    n, vocab = 40, 45
    logits = torch.randn(n, vocab, generator=gen) * 1.5
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0])[torch.arange(n) % 4]
    top_k = torch.tensor([0, 1, 2, 5, 17, vocab, vocab + 3])[torch.randint(0, 7, (n,), generator=gen)]
    top_p = torch.tensor([1.0, 0.95, 0.7, 0.4, 0.1, 1e-3])[torch.randint(0, 6, (n,), generator=gen)]
    for tk, tp in [(top_k, top_p), (top_k, None), (None, top_p)]:
        ref = probabilities(logits, temperature, tk, tp)
        got = probabilities_triton(*[a.to(DEVICE) if a is not None else None for a in (logits, temperature, tk, tp)],
                                   block_v=BLOCK_V).cpu()
        assert torch.equal(got > 0, ref > 0)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def verify_case(seed: int, batch: int, k: int, vocab: int, *, top_k: bool, top_p: bool, greedy_rows: bool,
                dtype=torch.float32, masked_vocab: int = 0):
    """Arguments of `speculative_verify` as the engine builds them: drafts sampled (by the
    reference) from a drafter close to the target, uniforms a column slice of a wider draw."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    logits = torch.randn(batch, k + 1, vocab, generator=gen) * 2
    if masked_vocab:
        logits[..., vocab - masked_vocab:] = float("-inf")  # padded vocabulary entries
    temps = [0.6, 1.0, 1.7] + ([0.0] if greedy_rows else [])
    temperature = torch.tensor([temps[(seed + i) % len(temps)] for i in range(batch)])
    tk = torch.tensor([rng.choice([0, 1, 3, vocab // 2, vocab + 5]) for _ in range(batch)]) if top_k else None
    tp = torch.tensor([rng.choice([1.0, 0.9, 0.6, 0.3, 0.05]) for _ in range(batch)]) if top_p else None
    u = torch.rand(batch, 2 * k + 1, generator=gen)
    if k:
        draft_logits = logits[:, :k] + 0.7 * torch.randn(batch, k, vocab, generator=gen)
        drafts, q = sample(draft_logits, temperature, tk, tp, u[:, :k])
    else:
        drafts, q = torch.zeros(batch, 0, dtype=torch.long), None
    args = [logits.to(dtype), drafts, q, temperature, tk, tp, u[:, k:]]  # u[:, k:] is not contiguous
    return [a.to(DEVICE) if a is not None else None for a in args]


def check_equal(args, greedy=False, block_v=BLOCK_V):
    n_acc, tokens, logprobs = speculative_verify_triton(*args, greedy=greedy, block_v=block_v)
    if greedy:
        ref = greedy_verify_reference(args[0], args[1], args[3])
    else:
        ref = speculative_verify_reference(*args)
    assert n_acc.dtype == tokens.dtype == torch.long and logprobs.dtype == torch.float32
    assert tokens.shape == logprobs.shape == ref[1].shape
    assert torch.equal(n_acc, ref[0]), (n_acc, ref[0])
    assert torch.equal(tokens, ref[1]), (tokens, ref[1])
    torch.testing.assert_close(logprobs, ref[2], rtol=0, atol=1e-5)
    return n_acc


CASES = [  # batch, K, vocab, top_k, top_p, greedy rows
    (4, 3, 77, False, False, True),
    (3, 3, 50, True, False, False),
    (4, 2, 45, False, True, True),
    (2, 3, 100, True, True, True),
    (3, 1, 17, True, True, False),
    (1, 3, 63, True, True, False),
    (4, 0, 33, True, True, True),
]


@pytest.mark.parametrize("seed", range(len(CASES)))
def test_matches_reference(seed):
    batch, k, vocab, top_k, top_p, greedy_rows = CASES[seed]
    check_equal(verify_case(seed, batch, k, vocab, top_k=top_k, top_p=top_p, greedy_rows=greedy_rows))


def test_acceptance_counts_cover_0_to_k():
    """Over a batch with a good drafter every n_accepted from 0 to K occurs (the coverage the
    comparison above needs), and both agree."""
    n_acc = check_equal(verify_case(11, 16, 3, 21, top_k=False, top_p=False, greedy_rows=True))
    assert set(n_acc.tolist()) == {0, 1, 2, 3}, n_acc


def test_bf16_logits_and_masked_vocabulary():
    check_equal(verify_case(21, 3, 2, 40, top_k=True, top_p=True, greedy_rows=True, dtype=torch.bfloat16,
                            masked_vocab=5))


def test_one_block_and_default_block():
    args = verify_case(22, 2, 3, 90, top_k=True, top_p=True, greedy_rows=False)
    check_equal(args, block_v=128)  # the whole vocabulary in one partial block
    ref = speculative_verify_reference(*args)
    out = speculative_verify_triton(*args)  # the default block
    assert all(torch.equal(a, b) for a, b in zip(out[:2], ref[:2]))


def test_greedy_flag():
    """greedy=True: no draft distributions, no uniforms; the result of the argmax path, and of
    the general path with one-hot draft distributions."""
    logits, drafts, _, _, _, _, u = verify_case(31, 4, 3, 29, top_k=False, top_p=False, greedy_rows=True)
    drafts[:2] = logits[:2, :3].argmax(-1)  # two rows draft exactly the target's choices
    temperature = torch.zeros(4, device=DEVICE)
    n_acc = check_equal([logits, drafts, None, temperature, None, None, None], greedy=True)
    assert n_acc[:2].tolist() == [3, 3]
    one_hot = torch.nn.functional.one_hot(drafts, 29).float()
    check_equal([logits, drafts, one_hot, temperature, None, None, u])


# ---- losslessness -------------------------------------------------------------------------
# Fixed target and draft distributions per position (vocabulary 5, K = 3). The draft puts its
# mass where the target has little, so a wrong rule shows at this sample size.
TARGET = torch.tensor([[0.40, 0.25, 0.15, 0.12, 0.08],
                       [0.10, 0.30, 0.05, 0.35, 0.20],
                       [0.25, 0.25, 0.20, 0.20, 0.10],
                       [0.05, 0.10, 0.15, 0.30, 0.40]])
DRAFT = torch.tensor([[0.05, 0.05, 0.20, 0.35, 0.35],
                      [0.30, 0.10, 0.30, 0.10, 0.20],
                      [0.05, 0.55, 0.05, 0.30, 0.05]])
SAMPLES = 400


def pvalue(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; cells expecting < 5 samples are pooled (as test_lossless.py)."""
    observed = observed.double()
    expected = expected_probs.double() * observed.sum()
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    return float(chisquare(observed.numpy(), (expected * observed.sum() / expected.sum()).numpy()).pvalue)


def position_pvalues(verify) -> list[float]:
    """p-values, per position j, of the tokens emitted at j by the rows that reach j (every
    earlier draft accepted) against the target at j; and the rows reaching each position."""
    gen = torch.Generator().manual_seed(0)
    n, (k1, vocab) = SAMPLES, TARGET.shape
    drafts = torch.multinomial(DRAFT, n, replacement=True, generator=gen).T
    u = torch.rand(n, k1, generator=gen)
    args = [TARGET.log().expand(n, -1, -1), drafts, DRAFT.expand(n, -1, -1), torch.ones(n), None, None, u]
    n_acc, tokens, _ = verify(*[a.to(DEVICE) if a is not None else None for a in args])
    n_acc, tokens = n_acc.cpu(), tokens.cpu()
    reached = [int((n_acc >= j).sum()) for j in range(k1)]
    assert min(reached) >= 40, reached  # enough samples at the last position for the test
    return [pvalue(torch.bincount(tokens[n_acc >= j, j], minlength=vocab), TARGET[j]) for j in range(k1)]


def test_kernel_samples_follow_the_target():
    ps = position_pvalues(lambda *a: speculative_verify_triton(*a, block_v=BLOCK_V))
    assert min(ps) > 1e-3, ps


@pytest.mark.parametrize("broken", ["accept min(1, q/p)", "no residual resampling"])
def test_the_sample_size_catches_a_wrong_rule(monkeypatch, broken):
    """The same test on the same draws fails for the reference with a wrong rule."""
    if broken.startswith("accept"):
        monkeypatch.setattr(sampling, "accept_draft", lambda p, q, u: u * p < q)
    else:
        monkeypatch.setattr(sampling, "residual", lambda p, q: p)
    ps = position_pvalues(speculative_verify_reference)
    assert min(ps) < 1e-6, ps


# ---- dispatch -----------------------------------------------------------------------------
def test_dispatcher_routes(monkeypatch):
    calls = []
    real = triton_sampling.speculative_verify_triton

    def spy(*args, **kwargs):
        calls.append(kwargs.get("greedy"))
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_sampling, "speculative_verify_triton", spy)
    args = verify_case(41, 2, 2, 19, top_k=True, top_p=True, greedy_rows=True)
    ref = speculative_verify_reference(*args)
    monkeypatch.delenv("MIMO_SAMPLING_BACKEND", raising=False)
    out = speculative_verify(*args)  # auto: the kernels on CUDA, the reference elsewhere
    assert calls == ([False] if DEVICE == "cuda" else [])
    assert all(torch.equal(a, b) for a, b in zip(out[:2], ref[:2]))
    calls.clear()
    out = speculative_verify(*args, backend="triton")
    monkeypatch.setenv("MIMO_SAMPLING_BACKEND", "triton")
    out_env = speculative_verify(*args)
    assert calls == [False, False]
    for o in (out, out_env):
        assert all(torch.equal(a, b) for a, b in zip(o[:2], ref[:2]))
    calls.clear()
    monkeypatch.setenv("MIMO_SAMPLING_BACKEND", "torch")
    speculative_verify(*args)
    assert calls == []
    with pytest.raises(ValueError, match="sampling backend"):
        speculative_verify(*args, backend="cuda")

"""Sampling math of the rollout engine: filtering, draws from pre-drawn uniforms, and the
verification step of speculative decoding.

Every function is vectorised over rows and never synchronises with the host, so a step of the
engine can be queued on a GPU without waiting. Randomness comes in as uniforms the caller drew
(the engine derives them from per-request seeds), which makes the math a pure function that a
kernel can reproduce bit for bit.

Conventions shared by every function here (per row b, broadcast over any positions axis):
  temperature[b] > 0 samples from softmax(logits / T); temperature[b] == 0 is greedy: the
      distribution is one-hot on argmax(logits) (the first index among ties).
  top_k[b] > 0 keeps the k largest logits (ties with the k-th are kept too); 0 keeps all.
  top_p[b] in (0, 1] keeps the smallest prefix of tokens, by decreasing probability after
      temperature and top-k, whose mass reaches top_p (at least one token); 1.0 keeps all.
  top_k / top_p may be None: no row filters (saves a sort of the vocabulary).
  Log-probs are log_softmax(logits / T) of the unfiltered logits (T = 1 for greedy rows): the
      target policy at the sampling temperature, what the trainer recomputes.

`speculative_verify` is the dispatcher the engine calls: the fused Triton kernels of
kernels/triton_sampling.py on CUDA tensors (when triton is installed), the plain-PyTorch
reference `speculative_verify_reference` (or `greedy_verify_reference`) elsewhere. The
environment variable MIMO_SAMPLING_BACKEND=torch|triton (or the `backend` argument) forces one;
the Triton backend on CPU tensors needs TRITON_INTERPRET=1 set before triton is first imported.
"""

from __future__ import annotations

import importlib.util
import os

import torch

NEG_INF = float("-inf")


def _per_row(param: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row parameter [B] viewed to broadcast against like [B, ..., V]."""
    return param.view(param.shape[0], *([1] * (like.dim() - 1)))


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """logits [B, ..., V] with -inf outside each row's top-k / top-p set (top-k first).

    Both filters keep every token at or above a per-row threshold logit, found on one sort."""
    if top_k is None and top_p is None:
        return logits
    vocab = logits.shape[-1]
    sorted_logits = logits.sort(dim=-1, descending=True).values
    keep = torch.full(logits.shape[:-1], vocab, dtype=torch.long, device=logits.device)
    if top_k is not None:
        k = _per_row(top_k, keep)
        keep = torch.where(k > 0, k.clamp(max=vocab), keep)
    if top_p is not None:
        rank = torch.arange(vocab, device=logits.device)
        probs = sorted_logits.masked_fill(rank >= keep[..., None], NEG_INF).softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        # The kept set is a prefix (mass_before grows); the first token is always kept.
        in_p = (mass_before < _per_row(top_p, probs)).sum(-1).clamp(min=1)
        keep = torch.minimum(keep, in_p)
    threshold = sorted_logits.gather(-1, (keep - 1)[..., None])
    return logits.masked_fill(logits < threshold, NEG_INF)


def probabilities(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None = None,
                  top_p: torch.Tensor | None = None) -> torch.Tensor:
    """The sampling distribution [B, ..., V] (fp32) of logits [B, ..., V] under each row's params."""
    logits = logits.float()
    t = _per_row(temperature, logits)
    greedy = t <= 0
    probs = filter_logits(logits / torch.where(greedy, 1.0, t), top_k, top_p).softmax(-1)
    one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy, one_hot, probs)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row from (possibly unnormalised) probs [..., V] by inverse CDF with u [...]
    in [0, 1). A zero-probability token is never returned."""
    cdf = probs.cumsum(-1)
    x = u[..., None].to(cdf.dtype) * cdf[..., -1:]
    idx = (cdf <= x).sum(-1)
    # Rounding can put x at the total mass: fall back to the last token with mass.
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1)
    return torch.minimum(idx, last)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None,
           top_p: torch.Tensor | None, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain sampling (the engine's drafts and first tokens): tokens [B, ...] and the
    distribution [B, ..., V] they were drawn from."""
    probs = probabilities(logits, temperature, top_k, top_p)
    return draw(probs, u), probs


def target_logprobs(logits: torch.Tensor, temperature: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits / T)[tokens] (T = 1 for greedy rows); 0 where tokens < 0."""
    t = _per_row(temperature, logits).float()
    logp = (logits.float() / torch.where(t > 0, t, 1.0)).log_softmax(-1)
    out = logp.gather(-1, tokens.clamp(min=0)[..., None]).squeeze(-1)
    return out.masked_fill(tokens < 0, 0.0)


# The two rules of speculative sampling, named so that a test can swap in a wrong one and
# show the losslessness test catches it.
def accept_draft(p_draft: torch.Tensor, q_draft: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Accept with probability min(1, p/q): u < p/q, written without a division."""
    return u * q_draft < p_draft


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distribution to resample from after a rejection: max(0, p - q) (unnormalised)."""
    return (p - q).clamp(min=0)


def speculative_verify_reference(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch speculative verification; see `speculative_verify` for the contract."""
    batch, k1, vocab = target_logits.shape
    k = k1 - 1
    p = probabilities(target_logits, temperature, top_k, top_p)  # [B, K+1, V]
    if k > 0:
        p_d = p[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)
        q_d = draft_probs.float().gather(-1, draft_tokens[..., None]).squeeze(-1)
        accepted = accept_draft(p_d, q_d, uniforms[:, :k].float())
        n_accepted = accepted.long().cumprod(-1).sum(-1)  # drafts before the first rejection
        q = torch.cat([draft_probs.float(), torch.zeros_like(p[:, :1])], dim=1)
    else:
        n_accepted = torch.zeros(batch, dtype=torch.long, device=p.device)
        q = torch.zeros_like(p)
    # After a rejection at j: resample from max(0, p_j - q_j). After K acceptances: the bonus
    # token from p_K (q_K = 0 makes it the same formula).
    at = n_accepted.view(batch, 1, 1).expand(batch, 1, vocab)
    p_at, q_at = p.gather(1, at).squeeze(1), q.gather(1, at).squeeze(1)
    dist = residual(p_at, q_at)
    dist = torch.where(dist.sum(-1, keepdim=True) > 0, dist, p_at)  # p == q cannot reject; guard only
    last = draw(dist, uniforms[:, k])

    j = torch.arange(k1, device=p.device)
    tokens = torch.cat([draft_tokens, torch.zeros_like(draft_tokens[:, :1])], dim=1) if k else last[:, None]
    tokens = torch.where(j == n_accepted[:, None], last[:, None], tokens)
    tokens = tokens.masked_fill(j > n_accepted[:, None], -1)
    return n_accepted, tokens, target_logprobs(target_logits, temperature, tokens)


def greedy_verify_reference(target_logits: torch.Tensor, draft_tokens: torch.Tensor,
                            temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`speculative_verify` when every row is greedy: the same result from argmaxes alone."""
    k = draft_tokens.shape[1]
    best = target_logits.argmax(-1)  # [B, K+1]
    n_accepted = (draft_tokens == best[:, :k]).long().cumprod(-1).sum(-1)
    # Accepted drafts equal the argmax, so the emitted tokens are the argmaxes up to n_accepted.
    j = torch.arange(k + 1, device=best.device)
    tokens = best.masked_fill(j > n_accepted[:, None], -1)
    return n_accepted, tokens, target_logprobs(target_logits, temperature, tokens)


def speculative_verify(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    uniforms: torch.Tensor | None,
    *,
    greedy: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Verify K drafted tokens per row against the target and emit 1..K+1 tokens per row.

    Inputs (B rows, K >= 0 drafts, V vocab; all on one device):
      target_logits [B, K+1, V] float: the target's logits at the K+1 verified positions
          (position j predicts the token after draft j; position 0 follows the last kept token).
      draft_tokens  [B, K] int64: the drafted tokens (ignored when K == 0; may be [B, 0]).
      draft_probs   [B, K, V] float: the exact distribution each draft token was drawn from
          (rows sum to 1; one-hot for greedy rows); None when K == 0.
      temperature   [B] float, top_k [B] int64 or None, top_p [B] float or None: the row's
          sampling params, applied to the target as in the module docstring.
      uniforms      [B, K+1] float in [0, 1): column j < K decides draft j, column K draws the
          final token.
    Rule (standard speculative sampling, lossless): draft j is accepted iff every earlier draft
    was and u_j * q_j(d_j) < p_j(d_j), i.e. with probability min(1, p/q); at the first
    rejection j the final token is drawn from max(0, p_j - q_j) normalised; after K
    acceptances it is the bonus token drawn from p_K. Draws are inverse-CDF with one uniform.
    Greedy rows (T == 0, one-hot p and q) accept exactly the drafts equal to the target argmax.
    Outputs:
      n_accepted [B] int64 in [0, K]: accepted drafts; the row emits n_accepted + 1 tokens.
      tokens     [B, K+1] int64: the emitted tokens in order (accepted drafts, then the final
          token at index n_accepted), -1 after.
      logprobs   [B, K+1] float32: log_softmax(target_logits / T) of each emitted token
          (T = 1 for greedy rows, logits unfiltered), 0 where tokens == -1.
    greedy=True promises temperature == 0 on every row (draft_probs and uniforms may then be
    None): the same outputs, computed from argmaxes only.
    No host synchronisation.
    backend: "auto" (default: Triton on CUDA tensors when triton is installed, the reference
    elsewhere), "torch" (alias "reference") or "triton"; None reads MIMO_SAMPLING_BACKEND, then
    falls back to "auto". The kernels use the same uniforms, so on the same inputs they return
    the reference's tokens and n_accepted (up to float rounding at a decision boundary, see
    kernels/triton_sampling.py) and its log-probs to 1e-5.
    """
    backend = backend or os.environ.get("MIMO_SAMPLING_BACKEND") or "auto"
    if backend not in SAMPLING_BACKENDS:
        raise ValueError(f"sampling backend must be one of {SAMPLING_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if target_logits.is_cuda and _HAS_TRITON else "torch"
    if backend == "triton":
        from mimo_train.kernels import triton_sampling

        if not target_logits.is_cuda and type(triton_sampling._emit_kernel).__name__ != "InterpretedFunction":
            raise RuntimeError("the Triton sampling kernels got CPU tensors but were compiled for a GPU; set "
                               "TRITON_INTERPRET=1 before triton is first imported")
        return triton_sampling.speculative_verify_triton(target_logits, draft_tokens, draft_probs, temperature,
                                                         top_k, top_p, uniforms, greedy=greedy)
    if greedy:
        return greedy_verify_reference(target_logits, draft_tokens, temperature)
    return speculative_verify_reference(target_logits, draft_tokens, draft_probs, temperature, top_k, top_p,
                                        uniforms)


SAMPLING_BACKENDS = ("auto", "torch", "reference", "triton")
_HAS_TRITON = importlib.util.find_spec("triton") is not None


__all__ = ["filter_logits", "probabilities", "draw", "sample", "target_logprobs", "speculative_verify",
           "speculative_verify_reference", "greedy_verify_reference"]

"""The torch reference (the contract every kernel is tested against) equals transformers' eager
MiMo-V2-Flash attention: a global layer and a sliding-window layer with sinks of both signs,
GQA and q/k head dim != v head dim, built inside transformers' model with random weights.

Both sides get the same q/k/v (transformers' projections, value scale and RoPE, captured from
its own forward) and transformers builds its own causal / sliding-window mask, so what is
compared is exactly masking + sinks + softmax + value sum. The same rows are also computed the
way the engine will ask for them: the last K+1 queries against a shuffled cache with empty
slots (a full cache for the global layer, a ring buffer for the window layer)."""

import functools

import pytest
import torch
from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import apply_rotary_pos_emb

from mimo_train.kernels.attention import attention_reference
from tests.model.hf_utils import hf_model, random_config

SEQ = 32
VERIFY = 4  # K + 1 query tokens of a verification step
TOL = 1e-5


@functools.cache
def transformers_forward(seed: int):
    """transformers' model for a random config, and what each attention layer received and
    returned in one forward over random tokens (sinks set to both signs first)."""
    cfg = random_config(seed)
    model = hf_model(cfg)
    seen = {}
    for index, layer in enumerate(model.model.layers):
        if layer.self_attn.sinks is not None:
            with torch.no_grad():
                layer.self_attn.sinks[0], layer.self_attn.sinks[-1] = 3.0, -3.0

        def hook(module, args, kwargs, output, index=index):
            seen[index] = dict(hidden=kwargs["hidden_states"], rope=kwargs["position_embeddings"], out=output[0])

        layer.self_attn.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(seed)))
    return cfg, model, seen


def transformers_layer(seed: int, swa: bool):
    """The config, the first attention layer of the kind, and what it saw."""
    cfg, model, seen = transformers_forward(seed)
    index = cfg.hybrid_layer_pattern.index(1 if swa else 0)
    attn = model.model.layers[index].self_attn
    assert (attn.sinks is not None) == swa
    return cfg, attn, seen[index]


def same_qkv(attn, seen):
    """q, k, v [b, s, heads, dim] exactly as transformers' layer computes them."""
    h = seen["hidden"]
    b, s, _ = h.shape
    q = attn.q_proj(h).view(b, s, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(b, s, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(b, s, -1, attn.v_head_dim) * attn.v_scale
    q, k = apply_rotary_pos_emb(q, k, *seen["rope"])
    return q.transpose(1, 2), k.transpose(1, 2), v


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("swa", [False, True], ids=["global", "swa_sinks"])
def test_reference_equals_transformers_eager(seed, swa):
    cfg, attn, seen = transformers_layer(seed, swa)
    q, k, v = same_qkv(attn, seen)
    heads, kv_heads = q.shape[2], k.shape[2]
    assert heads > kv_heads and q.shape[-1] != v.shape[-1]  # GQA, dk != dv
    window = None
    if swa:
        # transformers stores the window as sliding_window = ours + 1 (the query itself)
        window = attn.sliding_window - 1
        assert window == cfg.sliding_window_size < SEQ // 2
    pos = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        out, lse = attention_reference(q, k, v, scale=attn.scaling, q_pos=pos, k_pos=pos,
                                       sinks=attn.sinks, window=window)
        ours = attn.o_proj(out.reshape(2, SEQ, -1))
    assert lse.shape == (2, heads, SEQ) and torch.isfinite(lse).all()
    assert (ours - seen["out"]).abs().max().item() <= TOL


@pytest.mark.parametrize("swa", [False, True], ids=["global_full_cache", "swa_ring_buffer"])
def test_reference_verification_rows_equal_transformers(swa):
    cfg, attn, seen = transformers_layer(0, swa)
    q, k, v = same_qkv(attn, seen)
    window = attn.sliding_window - 1 if swa else None
    # the cache: only the keys this step may need (a ring of window + K + 1 for the window
    # layer), in shuffled slots, plus empty slots (position -1) holding garbage
    first = SEQ - VERIFY - window if swa else 0
    needed = torch.arange(first, SEQ)
    slots = needed.numel() + 3
    order = torch.randperm(slots)
    k_pos = torch.full((slots,), -1)
    k_pos[order[: needed.numel()]] = needed
    k_cache = torch.randn(2, slots, *k.shape[2:])
    v_cache = torch.randn(2, slots, *v.shape[2:])
    k_cache[:, order[: needed.numel()]] = k[:, needed]
    v_cache[:, order[: needed.numel()]] = v[:, needed]
    q_pos = torch.arange(SEQ - VERIFY, SEQ).expand(2, VERIFY)
    with torch.no_grad():
        out, _ = attention_reference(q[:, -VERIFY:], k_cache, v_cache, scale=attn.scaling, q_pos=q_pos,
                                     k_pos=k_pos.expand(2, slots), sinks=attn.sinks, window=window)
        ours = attn.o_proj(out.reshape(2, VERIFY, -1))
    assert (ours - seen["out"][:, -VERIFY:]).abs().max().item() <= TOL

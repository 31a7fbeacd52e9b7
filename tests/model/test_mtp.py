"""MTP layers: the depth-k logits equal an independent reference of the chain, and training
with the MTP loss lowers the main and every MTP loss.

The reference is written here from the MTP facts (docs/architecture.md), in plain PyTorch, without the code under
test: MTP layer k takes the previous depth's hidden state h (the main model's output after its
final norm for k = 0) and the embedding of the token k+1 places ahead, computes
eh_proj(cat(enorm(emb), hnorm(h))), runs one pre-norm block of SWA attention with sinks and a
dense SwiGLU FFN, applies final_layernorm, and the shared lm_head gives the logits.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import mimo_train
from mimo_train.data.copy_task import copy_batch
from mimo_train.model.config import ModelConfig
from mimo_train.model.gpt import build_model
from mimo_train.training.loss import lm_loss
from tests.model.hf_utils import hf_model, random_config, write_serving_dir

SEQ = 24


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def swa_block_attention(x, w, cfg: ModelConfig):
    b, s, _ = x.shape
    nh, nkv, dk, dv = cfg.swa_num_attention_heads, cfg.swa_num_key_value_heads, cfg.swa_head_dim, cfg.swa_v_head_dim
    q = (x @ w["self_attn.q_proj.weight"].T).view(b, s, nh, dk)
    k = (x @ w["self_attn.k_proj.weight"].T).view(b, s, nkv, dk)
    v = (x @ w["self_attn.v_proj.weight"].T).view(b, s, nkv, dv) * cfg.attention_value_scale
    rot = int(dk * cfg.partial_rotary_factor)
    freqs = torch.outer(torch.arange(s, dtype=torch.float32),
                        1.0 / cfg.swa_rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    def rope(t):  # pairs (i, i + rot/2) rotate together
        a, c, rest = t[..., : rot // 2], t[..., rot // 2: rot], t[..., rot:]
        return torch.cat([a * cos - c * sin, c * cos + a * sin, rest], dim=-1)

    q, k = rope(q), rope(k)
    group = nh // nkv
    out = torch.zeros(b, s, nh, dv)
    sinks = w["self_attn.attention_sink_bias"]
    for h in range(nh):
        scores = torch.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, h // group]) / math.sqrt(dk)
        i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
        visible = (j <= i) & (i - j <= cfg.sliding_window_size)
        scores = scores.masked_fill(~visible, float("-inf"))
        denom = torch.exp(scores).sum(-1, keepdim=True) + torch.exp(sinks[h])
        out[:, :, h] = torch.einsum("bqk,bkd->bqd", torch.exp(scores) / denom, v[:, :, h // group])
    return out.reshape(b, s, nh * dv) @ w["self_attn.o_proj.weight"].T


def main_hidden(hf, ids, feed: str = "chained") -> torch.Tensor:
    """What MTP layer 0 reads: transformers' last hidden state after its final norm (chained),
    or the input of that norm (target_hidden), caught by a hook on transformers' own module."""
    kept = []
    hook = hf.model.norm.register_forward_pre_hook(lambda _m, args: kept.append(args[0]))
    try:
        after = hf.model(ids).last_hidden_state
    finally:
        hook.remove()
    return after if feed == "chained" else kept[0]


def reference_mtp_logits(hf, weights, cfg: ModelConfig, ids, *, grad: bool = False):
    """Per MTP depth, lm_head logits of the chain (cfg.mtp_feed chained) or of every layer on
    the main model's pre-norm hidden state (target_hidden)."""
    eps = cfg.layernorm_epsilon
    with torch.set_grad_enabled(grad):
        h = feed = main_hidden(hf, ids, cfg.mtp_feed)
        tokens, logits = ids, []
        for k in range(cfg.num_nextn_predict_layers):
            w = {n.removeprefix(f"model.mtp.layers.{k}."): t for n, t in weights.items()
                 if n.startswith(f"model.mtp.layers.{k}.")}
            tokens = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
            e = rms(hf.model.embed_tokens(tokens), w["enorm.weight"], eps)
            x = torch.cat([e, rms(h, w["hnorm.weight"], eps)], dim=-1) @ w["eh_proj.weight"].T
            x = x + swa_block_attention(rms(x, w["input_layernorm.weight"], eps), w, cfg)
            m = rms(x, w["pre_mlp_layernorm.weight"], eps)
            x = x + (F.silu(m @ w["mlp.gate_proj.weight"].T) * (m @ w["mlp.up_proj.weight"].T)) @ w["mlp.down_proj.weight"].T
            out = rms(x, w["final_layernorm.weight"], eps)
            logits.append(hf.lm_head(out))
            h = out if cfg.mtp_feed == "chained" else feed
    return logits


def random_mtp_weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    hd, kv = cfg.hidden_size, cfg.swa_num_key_value_heads
    shapes = {
        "enorm.weight": (hd,), "hnorm.weight": (hd,), "final_layernorm.weight": (hd,),
        "input_layernorm.weight": (hd,), "pre_mlp_layernorm.weight": (hd,), "eh_proj.weight": (hd, 2 * hd),
        "self_attn.q_proj.weight": (cfg.swa_num_attention_heads * cfg.swa_head_dim, hd),
        "self_attn.k_proj.weight": (kv * cfg.swa_head_dim, hd),
        "self_attn.v_proj.weight": (kv * cfg.swa_v_head_dim, hd),
        "self_attn.o_proj.weight": (hd, cfg.swa_num_attention_heads * cfg.swa_v_head_dim),
        "self_attn.attention_sink_bias": (cfg.swa_num_attention_heads,),
        "mlp.gate_proj.weight": (cfg.intermediate_size, hd), "mlp.up_proj.weight": (cfg.intermediate_size, hd),
        "mlp.down_proj.weight": (hd, cfg.intermediate_size),
    }
    out = {}
    for k in range(cfg.num_nextn_predict_layers):
        for name, shape in shapes.items():
            t = torch.randn(shape)
            out[f"model.mtp.layers.{k}.{name}"] = 1 + 0.3 * t if "norm" in name else (2 * t if "sink" in name else 0.15 * t)
    return out


@pytest.mark.parametrize("depth, feed", [(1, "chained"), (2, "chained"), (3, "chained"), (3, "target_hidden")])
def test_mtp_logits_match_reference_chain(tmp_path, megatron_single, depth, feed):
    cfg = dataclasses.replace(random_config(10 + depth, mtp=depth), mtp_feed=feed)
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    weights = {**load_file(str(tmp_path / "hf" / "model.safetensors")), **random_mtp_weights(cfg)}
    write_serving_dir(tmp_path, cfg, weights)

    ours = mimo_train.load_hf(tmp_path)
    assert ours.config.num_nextn_predict_layers == depth and ours.config.mtp_feed == feed  # read from config.json
    ids = torch.randint(0, cfg.vocab_size, (2, SEQ))
    got = ours.all_logits(ids)
    expected = reference_mtp_logits(hf, weights, cfg, ids)
    assert len(got) == depth + 1
    for k in range(depth):
        assert (got[k + 1] - expected[k]).abs().max().item() <= 1e-4, f"MTP depth {k + 1}"


def test_main_and_mtp_losses_fall_on_copy_task(megatron_single):
    cfg = ModelConfig.preset("tiny", sliding_window_size=32)
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(30):
        ids, labels, mask = copy_batch(19, 16, 8, gen, loss_on_copy_only=True)  # 16 symbols
        loss, metrics = lm_loss(model(ids, labels=labels, loss_mask=mask), mtp_weight=0.3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert {"loss/main", "loss/mtp_1", "loss/mtp_2", "loss/mtp_3", "acc/mtp_3"} <= set(metrics)
        history.append(metrics)
    for name in ("loss/main", "loss/mtp_1", "loss/mtp_2", "loss/mtp_3"):
        start = sum(h[name] for h in history[:3]) / 3
        end = sum(h[name] for h in history[-3:]) / 3
        assert end < 0.6 * start, f"{name} went from {start:.3f} to {end:.3f}"

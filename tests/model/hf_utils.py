"""Helpers for tests that compare with transformers' MiMoV2FlashForCausalLM."""

from __future__ import annotations

import random

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, MiMoV2FlashConfig, MiMoV2FlashForCausalLM

from mimo_train.model.config import ModelConfig


def random_config(seed: int, mtp: int = 0) -> ModelConfig:
    """A random small config that transformers can express, with every feature the parity
    acceptance asks for: >= 2 global and >= 3 SWA layers, a window under half the test sequence
    (32 tokens), >= 4 experts with top-k >= 2."""
    rng = random.Random(seed)
    layers = rng.randint(5, 7)
    swa = [1] * layers
    for i in [0] + rng.sample(range(1, layers), 1):
        swa[i] = 0
    kv = rng.choice([1, 2])
    heads = kv * 2 * rng.choice([1, 2])  # SWA layers have 2*kv heads, which must divide heads
    head_dim = rng.choice([12, 18, 24])
    experts = rng.choice([4, 6, 8])
    v_head_dim = rng.choice([8, 16])
    return ModelConfig(
        vocab_size=rng.choice([97, 128]), hidden_size=rng.choice([32, 48]), num_hidden_layers=layers,
        intermediate_size=rng.choice([48, 64]), moe_intermediate_size=rng.choice([16, 24]),
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, v_head_dim=v_head_dim,
        swa_num_attention_heads=heads, swa_num_key_value_heads=2 * kv, swa_head_dim=head_dim, swa_v_head_dim=v_head_dim,
        hybrid_layer_pattern=swa, moe_layer_freq=[0] + [1] * (layers - 1),
        sliding_window_size=rng.choice([3, 5, 7]), n_routed_experts=experts,
        num_experts_per_tok=rng.choice([2, 3]), num_nextn_predict_layers=mtp,
        rope_theta=rng.choice([5e6, 1e5]), swa_rope_theta=1e4, max_position_embeddings=512)


def hf_model(cfg: ModelConfig) -> MiMoV2FlashForCausalLM:
    """transformers' model for cfg, weights randomised everywhere, including what its init
    leaves trivial (norm weights, sinks of both signs, an expert bias that changes choices)."""
    hub = cfg.to_hub_dict()
    hf_cfg = MiMoV2FlashConfig(**{k: hub[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "v_head_dim", "n_routed_experts",
        "num_experts_per_tok", "layer_types", "mlp_layer_types", "sliding_window", "rope_parameters",
        "rms_norm_eps", "attention_value_scale", "max_position_embeddings", "norm_topk_prob",
        "routed_scaling_factor", "n_group", "topk_group")})
    hf_cfg._attn_implementation = "eager"
    model = MiMoV2FlashForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("sinks"):
                p.copy_(2.0 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.5 * torch.randn_like(b))
    return model


def write_serving_dir(directory, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    cfg.save(directory)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))


def load_transformers(directory) -> MiMoV2FlashForCausalLM:
    return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32).eval()


def sgd_step(params, loss: torch.Tensor, lr: float) -> None:
    """p -= lr * d loss / d p for every parameter the loss reaches: the step the gradient
    parity tests take on both models."""
    params = list(params)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(lr * g)

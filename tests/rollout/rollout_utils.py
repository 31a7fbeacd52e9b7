"""Models for the rollout tests: transformers' MiMoV2FlashForCausalLM with random weights plus
random MTP layers, written as a serving directory (the format export writes)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file

from mimo_train.model.config import ModelConfig
from tests.model.hf_utils import hf_model, random_config, write_serving_dir
from tests.model.test_mtp import random_mtp_weights


@dataclasses.dataclass
class RandomModel:
    path: Path
    cfg: ModelConfig
    hf: torch.nn.Module  # transformers' model with the same main weights (it ignores MTP)
    weights: dict[str, torch.Tensor]  # serving names, MTP included


def make_model(directory: Path, seed: int, *, vocab: int | None = None, mtp: int = 3,
               repeat_drafts: bool = False) -> RandomModel:
    """With repeat_drafts, each MTP layer passes its hidden input through (eh_proj ~ [0, I],
    small attention / FFN outputs), so it drafts about what the main model predicted one
    position earlier: the last token again. Greedy random models repeat tokens now and then,
    so such drafts are sometimes accepted and sometimes rejected -- both paths run -- while
    fully random MTP layers are (almost) never accepted."""
    torch.manual_seed(seed)
    cfg = random_config(seed, mtp=mtp)
    if vocab is not None:
        cfg = dataclasses.replace(cfg, vocab_size=vocab)
    hf = hf_model(cfg)
    hf.save_pretrained(directory / "hf")
    weights = {**load_file(str(directory / "hf" / "model.safetensors")), **random_mtp_weights(cfg)}
    if repeat_drafts:
        hidden = cfg.hidden_size
        for k in range(mtp):
            layer = f"model.mtp.layers.{k}."
            weights[f"{layer}eh_proj.weight"] = torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], 1) \
                + 0.05 * torch.randn(hidden, 2 * hidden)
            for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
                weights[f"{layer}{name}"] *= 0.3
            for name in ("hnorm.weight", "final_layernorm.weight"):
                weights[f"{layer}{name}"] = torch.ones(hidden)
    write_serving_dir(directory, cfg, weights)
    return RandomModel(directory, cfg, hf, weights)


def random_prompts(cfg: ModelConfig, lengths, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]


def hf_greedy(hf, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():  # an explicit mask: generate would otherwise mask prompt tokens equal to pad
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def full_forward_logits(hf, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """transformers' logits [len(tokens), V] for every generated token, from one forward."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = hf(ids).logits[0].double()
    return logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)]

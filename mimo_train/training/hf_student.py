"""A transformers causal LM as a student (trainer.backend=deepspeed): its serving directory
checked and loaded, and its forward in the shape the shared loss code reads (`MiMoOutput`).

The directory is what `save_pretrained` writes: config.json, *.safetensors, tokenizer files.
Weights load only from safetensors and never through remote code: a config that names its own
modelling code (`auto_map`) is refused, as is one whose `model_type` this transformers does not
know. The forward takes our packed rows as they are: position ids restart at every document,
and transformers builds the block-diagonal causal mask from them (`masking_utils`' packed
sequence detection), so documents in one row do not see each other, as under megatron's
`cu_seqlens` (tests/training/test_deepspeed.py checks a step against one document at a time).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mimo_train.model.gpt import MiMoOutput


class StudentError(ValueError):
    """A student directory that cannot be trained; the message says why and what to do."""


def read_config(model_dir: str | Path) -> dict:
    """The student's config.json, checked: safetensors weights, no remote code, a known type."""
    d = Path(model_dir)
    where = f"trainer.model_dir={model_dir}"
    if not (d / "config.json").is_file():
        raise StudentError(f"{where}: no config.json there; give the serving directory of a transformers model "
                           "(what save_pretrained or tools/export.py writes)")
    if not any(d.glob("*.safetensors")):
        found = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
        raise StudentError(f"{where}: no *.safetensors weights ({'found ' + ', '.join(found[:3]) if found else 'none'}); "
                           "only safetensors are loaded (pickle files can run code): convert with "
                           "model.save_pretrained(dir, safe_serialization=True)")
    cfg = json.loads((d / "config.json").read_text())
    check_config(cfg, where)
    return cfg


def check_config(cfg: dict, where: str) -> None:
    """A config.json transformers builds with its own classes: no remote code, a known type."""
    from transformers import CONFIG_MAPPING

    if cfg.get("auto_map"):
        raise StudentError(f"{where}: config.json names its own modelling code (auto_map {sorted(cfg['auto_map'])}), "
                           "which would need trust_remote_code; this project never runs remote code: use a model "
                           "type transformers ships")
    kind = cfg.get("model_type")
    if kind not in CONFIG_MAPPING:
        raise StudentError(f"{where}: model_type {kind!r} is not one this transformers knows; use a model type "
                           "transformers ships (remote code is never run)")


def apply_facts(model_config, hf: dict) -> None:
    """The RL loop, teachers and rollout read a few sizes from `config.model`; for a transformers
    student they come from its config.json. The MiMo-only parts are off: no MTP layers, no MoE
    (so nothing routes, drafts or replays)."""
    text = hf.get("text_config", hf)
    model_config.vocab_size = int(text["vocab_size"])
    model_config.max_position_embeddings = int(text.get("max_position_embeddings") or model_config.max_position_embeddings)
    model_config.num_nextn_predict_layers = 0
    model_config.moe_layer_freq = [0] * model_config.num_hidden_layers


def load_model(model_dir: str | Path, dtype: torch.dtype):
    """The model with its weights (safetensors only, no remote code). Under ZeRO-3 the caller
    has made transformers' DeepSpeed hook live (HfDeepSpeedConfig), and each rank keeps only its
    partition of every parameter from the start."""
    from transformers import AutoModelForCausalLM

    read_config(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=False)
    model.config.use_cache = False  # training: no KV cache
    return model


def forward(model, mb: dict, *, temperature: float = 1.0, keep_logits: bool = False) -> MiMoOutput:
    """Per-token cross-entropy of `labels` at `temperature` (= -log-prob, what the RL loss reads),
    the loss mask, top-1 hits, and (keep_logits) the tempered logits [1, s, vocab]."""
    logits = model(input_ids=mb["tokens"], position_ids=mb["position_ids"], use_cache=False).logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    labels = mb["labels"]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    hit = logits.detach().argmax(-1) == labels
    return MiMoOutput(logits=[logits] if keep_logits else [], losses=[ce], loss_masks=[mb["loss_mask"].float()],
                      correct=[hit])

"""`export --verify`: logits of the exported directory against the training model's.

The training model is rebuilt in one process and loaded with the training code's own
`checkpoint.load` (megatron dist_checkpointing), not with the export's reader, so a mistake in
the export's reading or naming shows up as a difference. The export is read back by
transformers (`AutoModelForCausalLM`, never remote code) when transformers can express the
config and the weights are not FP8; otherwise by our loader (dequantising FP8), which is said
in the result.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mimo_train.model.config import ModelConfig

PROMPTS, SEQ_LEN = 3, 24


def prompts(cfg: ModelConfig, n: int = PROMPTS, seq_len: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (n, min(seq_len, cfg.max_position_embeddings)), generator=gen)


def _one_rank_model(cfg: ModelConfig):
    from mimo_train.model.gpt import build_model
    from mimo_train.model.spec import MegatronOptions
    from mimo_train.parallel.setup import init_distributed

    init_distributed()  # one rank (a fresh group, or megatron state reset to TP=PP=EP=1)
    return build_model(cfg, MegatronOptions()).eval()


@torch.no_grad()
def training_logits(iter_dir: Path, cfg: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    from mimo_train.training import checkpoint

    model = _one_rank_model(cfg)
    checkpoint.load(iter_dir, [model], None, load_optimizer=False, load_rng=False)
    return model(ids).logits[0].float()


@torch.no_grad()
def serving_logits(directory: Path, ids: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Logits [b, s, vocab] of the main model of a serving directory, and who computed them."""
    from mimo_train.convert.serving_reader import ServingSource

    source = ServingSource(directory)
    cfg = source.config
    why = cfg.transformers_compatible()
    if not why and not source.fp8:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager",
                                                  trust_remote_code=False).eval()
        return hf(ids).logits.float(), "transformers"
    from mimo_train.convert.importer import fill

    model = _one_rank_model(cfg)
    fill(model, source.ours())
    reason = "FP8 weights" if source.fp8 else "; ".join(why)
    return model(ids).logits[0].float(), f"mimo_train loader ({reason})"


def verify_export(directory: str | Path, iter_dir: str | Path, cfg: ModelConfig) -> dict:
    ids = prompts(cfg)
    ours = training_logits(Path(iter_dir), cfg, ids)
    theirs, reference = serving_logits(Path(directory), ids)
    diff = (ours - theirs).abs().max().item()
    return {"max_abs_diff": diff, "reference": reference, "prompts": ids.shape[0], "seq_len": ids.shape[1]}

"""Training-step throughput: our megatron-core trainer vs transformers' MiMoV2FlashForCausalLM.

    python tools/bench_train.py [--model small] [--seq 256] [--batch 4] [--steps 5] [--dtype auto]

Both train the same config (MTP layers off, since transformers' model has none) on the same
token batch, on the same device and in the same precision, one process, AdamW, in this one run:
the batch's rows go through one at a time and their gradients accumulate before one optimizer
step (our micro-batch of one packed row), both are warmed up (2 steps) before the timed steps,
and GPU work is synchronised before each clock read. Precision: fp32 on CPU; on a GPU bf16
(ours: megatron's bf16 parameters with fp32 master weights; transformers': fp32 parameters under
bf16 autocast, its usual mixed precision), or --dtype fp32 for both. The JSON gives tokens/s of
each, the ratio, and where it ran (tools/bench_env.py). Ours also reports its step with the MTP
depths on, the configuration we train.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_env import environment, sync  # noqa: E402

HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "head_dim", "v_head_dim", "n_routed_experts",
           "num_experts_per_tok", "layer_types", "mlp_layer_types", "sliding_window", "rope_parameters",
           "rms_norm_eps", "attention_value_scale", "max_position_embeddings", "norm_topk_prob",
           "routed_scaling_factor", "n_group", "topk_group")


def batch_of(vocab: int, batch: int, seq: int) -> list[dict]:
    """`batch` packed rows of one document each, as our data pipeline collates them."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch):
        tokens = torch.randint(4, vocab, (1, seq), generator=g)
        labels = torch.cat([tokens[:, 1:], torch.zeros(1, 1, dtype=torch.long)], dim=1)
        mask = torch.ones(1, seq)
        mask[0, -1] = 0
        rows.append({"tokens": tokens, "labels": labels, "loss_mask": mask,
                     "position_ids": torch.arange(seq)[None], "cu_seqlens": torch.tensor([0, seq], dtype=torch.int32),
                     "max_seqlen": seq})
    return rows


def timed(step, steps: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def ours(model: str, mtp: int, rows: list[dict], steps: int, device: torch.device, bf16: bool) -> float:
    from mimo_train.parallel.layout import check_layout
    from mimo_train.parallel.setup import init_distributed
    from mimo_train.training.config import load_config
    from mimo_train.training.trainer import Trainer

    cfg = load_config(["recipe=pretrain", f"model={model}", f"model.num_nextn_predict_layers={mtp}",
                       f"train.global_batch={len(rows)}", "train.micro_batch=1", "optim.warmup_steps=0",
                       f"train.bf16={str(bf16).lower()}"])
    init_distributed(seed=0)
    trainer = Trainer(cfg, check_layout(cfg.model, 1, 1, 1, 1, None, len(rows), 1))
    assert trainer.device.type == device.type, f"our trainer runs on {trainer.device}, the baseline on {device}"
    return timed(lambda: trainer.train_step(rows), steps, device)


def transformers_step(model: str, rows: list[dict], steps: int, device: torch.device, bf16: bool) -> float:
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

    from mimo_train.model.config import ModelConfig

    hub = ModelConfig.preset(model).to_hub_dict()
    hf_cfg = MiMoV2FlashConfig(**{k: hub[k] for k in HF_KEYS})
    hf_cfg._attn_implementation = "eager"  # the implementation that supports sinks + window
    hf = MiMoV2FlashForCausalLM(hf_cfg).to(device).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    micro = [(r["tokens"].to(device), r["labels"].to(device), r["loss_mask"].to(device)) for r in rows]

    def step():
        opt.zero_grad()
        for tokens, labels, mask in micro:  # one packed row per micro-batch, as ours
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = hf(input_ids=tokens).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
            ((loss * mask.flatten()).sum() / mask.sum() / len(micro)).backward()
        opt.step()

    return timed(step, steps, device)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 on a GPU, fp32 on CPU (what runs use)")
    args = parser.parse_args(argv)
    from mimo_train.model.config import ModelConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    rows = batch_of(ModelConfig.preset(args.model).vocab_size, args.batch, args.seq)
    tokens = args.batch * args.seq
    torch.manual_seed(0)
    t_hf = transformers_step(args.model, rows, args.steps, device, bf16)
    t_ours = ours(args.model, 0, rows, args.steps, device, bf16)
    t_ours_mtp = ours(args.model, ModelConfig.preset(args.model).num_nextn_predict_layers, rows, args.steps,
                      device, bf16)
    result = {
        "model": args.model, "tokens_per_step": tokens, "micro_batches": args.batch, "steps": args.steps,
        **environment(device, "bfloat16" if bf16 else "float32"),
        "transformers_tokens_per_s": round(tokens / t_hf, 1),
        "ours_tokens_per_s": round(tokens / t_ours, 1),
        "ours_with_mtp_tokens_per_s": round(tokens / t_ours_mtp, 1),
        "ratio_ours_vs_transformers": round(t_hf / t_ours, 3),
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_MODE", "disabled")
    main(sys.argv[1:])

"""Training-step throughput: our megatron-core trainer vs transformers' MiMoV2FlashForCausalLM,
or vs the DeepSpeed backend (trainer=deepspeed).

    python tools/bench_train.py [--model small] [--seq 256] [--batch 4] [--steps 5] [--dtype auto]
    python tools/bench_train.py --backend deepspeed [--zero-stage 3] [--model small] ...

Both train the same config (MTP layers off, since transformers' model has none) on the same
token batch, on the same device and in the same precision, one process, AdamW, in this one run:
the batch's rows go through one at a time and their gradients accumulate before one optimizer
step (our micro-batch of one packed row), each is warmed up (2 steps), then the sides take their
timed steps in turn (so a load on the machine that comes and goes slows all alike; the JSON
keeps every step's seconds), and GPU work is synchronised before each clock read.
Precision: fp32 on CPU; on a GPU bf16
(ours: megatron's bf16 parameters with fp32 master weights; transformers': fp32 parameters under
bf16 autocast, its usual mixed precision), or --dtype fp32 for both. The JSON gives tokens/s of
each, the ratio, and where it ran (tools/bench_env.py). Ours also reports its step with the MTP
depths on, the configuration we train, and that step's time over ours without them.

"split" gives, for each of the three (ours, ours_with_mtp, transformers), where a step's time goes
(tools/step_split.py): forward, backward and optimizer seconds per step, and per module kind
(attention, MoE router, MoE dispatch, experts, dense MLP, norms, embedding, output layer + loss,
MTP) the forward and backward seconds, "other" being what no kind holds. It is measured in
--split-steps further steps of the same trainer after its timed ones, with hooks that cost time
(so its step_s is not the headline figure: timed_step_s is), and the hooks are removed after;
--no-split leaves it out. On transformers' side the loss (a full-vocabulary cross-entropy) runs
in a module of its own, TokenLoss, so that it is counted with lm_head as "output_loss".

--backend deepspeed times the two trainers the project has, Trainer (megatron-core) and
DeepSpeedTrainer (ZeRO, one rank), on one model function both express: the preset made dense
(moe_layer_freq all 0) and without MTP layers, since a DeepSpeed student is a plain transformers
causal LM. The megatron trainer is built first; its initial weights go through the project's own
export (a weights-only checkpoint, then convert.export_checkpoint) into the serving directory
that DeepSpeed's transformers MiMoV2FlashForCausalLM loads, so both start from equal weights.
Both then take the same packed micro-batches (one train_step per optimizer step, the batch's rows
as micro-batches of one packed row), in the same dtype (bf16 on a GPU: bf16 parameters with fp32
master weights on both sides), AdamW with the same betas, eps, weight decay groups (none on 1-D
parameters), global-norm clipping and learning-rate schedule, warmed up by 2 steps. What still
differs: the forward itself (our megatron model and its attention, vs transformers' eager
attention and a full-vocabulary cross-entropy), the optimizer wrappers named in the JSON
("optimizers": megatron's distributed optimizer over one contiguous gradient buffer, ZeRO's
partitioned one), and under bf16 the gradient accumulation dtype (megatron reduces in fp32;
DeepSpeed's data_types.grad_accum_dtype is left at its default, the model's). Equal math is
checked, not assumed: the JSON gives both losses of step 1 (same weights, same batch) and of
step 2 (after one update each) and their differences; each side sums a micro-batch's token
losses in fp32, so a difference below that sum's rounding (about 1e-7 relative) reads as 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_env import environment, sync  # noqa: E402
from tools.step_split import StepSplit, model_split, trainer_split  # noqa: E402

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


def megatron_trainer(overrides: list[str], n_rows: int, device: torch.device, bf16: bool):
    """Our Trainer on one process, one optimizer step per batch of `n_rows` packed rows."""
    from mimo_train.parallel.layout import check_layout
    from mimo_train.parallel.setup import init_distributed
    from mimo_train.training.config import load_config
    from mimo_train.training.trainer import Trainer

    cfg = load_config(["recipe=pretrain", *overrides, *step_overrides(n_rows, bf16)])
    init_distributed(seed=0)
    trainer = Trainer(cfg, check_layout(cfg.model, 1, 1, 1, 1, None, n_rows, 1))
    assert trainer.device.type == device.type, f"our trainer runs on {trainer.device}, the baseline on {device}"
    return cfg, trainer


def step_overrides(n_rows: int, bf16: bool) -> list[str]:
    """What both trainers are given alike: the batch as micro-batches of one packed row, the LR
    at its peak from step 1 (no warmup), the precision."""
    return [f"train.global_batch={n_rows}", "train.micro_batch=1", "optim.warmup_steps=0",
            f"train.bf16={str(bf16).lower()}"]


@dataclasses.dataclass
class Side:
    """One side of the comparison: its training step, and the split of that step's time."""

    step: Callable[[], object]
    split: Callable[[], StepSplit]  # a fresh one each call, to use as a context manager


def ours(model: str, mtp: int, rows: list[dict], device: torch.device, bf16: bool) -> Side:
    _, trainer = megatron_trainer([f"model={model}", f"model.num_nextn_predict_layers={mtp}"], len(rows), device, bf16)
    return Side(lambda: trainer.train_step(rows), lambda: trainer_split(trainer))


class TokenLoss(torch.nn.Module):
    """Transformers' side of the loss: one micro-batch's masked token-mean cross-entropy over the
    full vocabulary, as a share of the batch (as our trainer weights it). A module so that the
    step split counts it (tools/step_split.py: output_loss, with lm_head)."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, n_micro: int) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        return (loss * mask.flatten()).sum() / mask.sum() / n_micro


def transformers_side(model: str, rows: list[dict], device: torch.device, bf16: bool) -> Side:
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

    from mimo_train.model.config import ModelConfig

    hub = ModelConfig.preset(model).to_hub_dict()
    hf_cfg = MiMoV2FlashConfig(**{k: hub[k] for k in HF_KEYS})
    hf_cfg._attn_implementation = "eager"  # the implementation that supports sinks + window
    hf = MiMoV2FlashForCausalLM(hf_cfg).to(device).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    loss_fn = TokenLoss()
    micro = [(r["tokens"].to(device), r["labels"].to(device), r["loss_mask"].to(device)) for r in rows]

    def step():
        opt.zero_grad()
        for tokens, labels, mask in micro:  # one packed row per micro-batch, as ours
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = hf(input_ids=tokens).logits
            loss_fn(logits, labels, mask, len(micro)).backward()
        opt.step()

    return Side(step, lambda: model_split(hf, loss_fn, opt, device))


def interleaved(steps_of: dict, steps: int, device: torch.device, warmup: int = 2) -> dict[str, list[float]]:
    """Hook-free seconds of each timed step of each side, the sides taking their steps in turn
    (after `warmup` steps each), so that a load on the machine that comes and goes slows all
    sides alike rather than whichever ran during it."""
    seconds = {name: [] for name in steps_of}
    for i in range(warmup + steps):
        for name, step in steps_of.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            if i >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def split_of(side: Side, timed_seconds: float, split_steps: int) -> dict:
    """The step's time split, in further steps after the timed ones (the hooks cost time)."""
    with side.split() as split:
        report = split.measure(side.step, split_steps)
    return {"timed_step_s": round(timed_seconds, 5), **report}


def dense(model: str) -> list[str]:
    """The preset as a model both backends express: every MLP dense, no MTP layers."""
    from mimo_train.model.config import ModelConfig

    layers = ModelConfig.preset(model).num_hidden_layers
    return [f"model={model}", "model.num_nextn_predict_layers=0", f"model.moe_layer_freq=[{','.join('0' * layers)}]"]


def export_initial(cfg, trainer, work: Path, bf16: bool) -> Path:
    """The megatron model's weights as they are now, through the project's own export path (a
    weights-only checkpoint, then the serving directory), for the DeepSpeed side to load."""
    from mimo_train.convert import export_checkpoint

    state = {**trainer.state(), "model": dataclasses.asdict(cfg.model), "layout": dataclasses.asdict(trainer.layout),
             "recipe": cfg.recipe}
    iter_dir = trainer.save_checkpoint(work / "checkpoints", state, keep_last=1)
    out = work / "serving"
    export_checkpoint(iter_dir, out, dtype="bf16" if bf16 else "fp32", mtp=False, tokenizer=None, progress=False)
    return out


def deepspeed_trainer(model_dir: Path, model: str, n_rows: int, bf16: bool, zero_stage: int):
    from mimo_train.parallel.layout import check_layout
    from mimo_train.training.config import load_config
    from mimo_train.training.deepspeed_trainer import DeepSpeedTrainer

    cfg = load_config(["recipe=pretrain", *dense(model), "trainer=deepspeed", f"trainer.model_dir={model_dir}",
                       f"trainer.zero_stage={zero_stage}", *step_overrides(n_rows, bf16)])
    return DeepSpeedTrainer(cfg, check_layout(cfg.model, 1, 1, 1, 1, None, n_rows, 1))


def optimizer_names(optimizer) -> list[str]:
    """The wrapper and the update rule inside it, e.g. Float16OptimizerWithFloat16Params(torch.optim.AdamW)."""
    names = []
    for o in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(o, "optimizer", None)
        rule = f"{type(inner).__module__}.{type(inner).__name__}" if inner is not None else "-"
        names.append(f"{type(o).__name__}({rule.replace('torch.optim.adamw', 'torch.optim')})")
    return names


def versus_deepspeed(model: str, rows: list[dict], steps: int, device: torch.device, bf16: bool,
                     zero_stage: int) -> dict:
    """Megatron Trainer vs DeepSpeedTrainer from equal weights on equal batches (module docstring),
    timed step by step in turn (`interleaved`)."""
    import tempfile

    torch.manual_seed(0)
    cfg, meg = megatron_trainer(dense(model), len(rows), device, bf16)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as work:
        served = export_initial(cfg, meg, Path(work), bf16)
        ds = deepspeed_trainer(served, model, len(rows), bf16, zero_stage)
    trainers = {"megatron": meg, "deepspeed": ds}
    losses = {name: [] for name in trainers}

    def step_of(name):
        return lambda: losses[name].append(trainers[name].train_step(rows).metrics["loss/main"])

    # 2 warm-up steps each (their losses are the parity check), then the timed ones.
    seconds = interleaved({name: step_of(name) for name in trainers}, steps, device, warmup=2)
    tokens = sum(int(r["tokens"].numel()) for r in rows)
    per_s = {name: tokens * len(s) / sum(s) for name, s in seconds.items()}
    parity = {}
    for step in (1, 2):
        a, b = losses["megatron"][step - 1], losses["deepspeed"][step - 1]
        parity[f"step{step}"] = {"megatron": a, "deepspeed": b, "abs_diff": abs(a - b), "rel_diff": abs(a - b) / abs(a)}
    return {
        "zero_stage": zero_stage,
        "optimizers": {"megatron": optimizer_names(meg.optimizer), "deepspeed": optimizer_names(ds.optimizer)},
        "megatron_tokens_per_s": round(per_s["megatron"], 1),
        "deepspeed_tokens_per_s": round(per_s["deepspeed"], 1),
        "ratio_deepspeed_vs_megatron": round(per_s["deepspeed"] / per_s["megatron"], 3),
        "step_seconds": {name: [round(t, 4) for t in s] for name, s in seconds.items()},
        # step 1: the same weights on the same batch; step 2: after one optimizer update on each side.
        "loss": parity,
    }


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 on a GPU, fp32 on CPU (what runs use)")
    parser.add_argument("--backend", choices=["transformers", "deepspeed"], default="transformers",
                        help="what our megatron trainer is timed against")
    parser.add_argument("--zero-stage", type=int, choices=[2, 3], default=3, help="--backend deepspeed: ZeRO stage")
    parser.add_argument("--split-steps", type=int, default=2,
                        help="steps of each side run again under the step split's hooks, after the timed ones "
                             "(--backend transformers)")
    parser.add_argument("--no-split", action="store_true", help="leave out the step split (the 'split' JSON)")
    args = parser.parse_args(argv)
    from mimo_train.model.config import ModelConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    rows = batch_of(ModelConfig.preset(args.model).vocab_size, args.batch, args.seq)
    tokens = args.batch * args.seq
    if args.backend == "deepspeed":
        env = environment(device, "bfloat16" if bf16 else "float32")
        env["versions"]["deepspeed"] = importlib.metadata.version("deepspeed")
        # DeepSpeed logs and its op builds print to stdout: keep stdout for the one JSON.
        with contextlib.redirect_stdout(sys.stderr):
            timed_pair = versus_deepspeed(args.model, rows, args.steps, device, bf16, args.zero_stage)
        result = {"model": f"{args.model} (dense, no MTP)", "tokens_per_step": tokens, "micro_batches": args.batch,
                  "steps": args.steps, **env, **timed_pair}
        print(json.dumps(result, indent=1))
        return result
    split_steps = 0 if args.no_split else args.split_steps
    if split_steps < 0:
        raise SystemExit(f"error: --split-steps {split_steps} is negative; give a step count, or --no-split")
    torch.manual_seed(0)
    mtp = ModelConfig.preset(args.model).num_nextn_predict_layers
    sides = {"transformers": transformers_side(args.model, rows, device, bf16),
             "ours": ours(args.model, 0, rows, device, bf16),
             "ours_with_mtp": ours(args.model, mtp, rows, device, bf16)}
    seconds = interleaved({name: side.step for name, side in sides.items()}, args.steps, device)
    per_step = {name: sum(s) / len(s) for name, s in seconds.items()}
    result = {
        "model": args.model, "tokens_per_step": tokens, "micro_batches": args.batch, "steps": args.steps,
        **environment(device, "bfloat16" if bf16 else "float32"),
        "transformers_tokens_per_s": round(tokens / per_step["transformers"], 1),
        "ours_tokens_per_s": round(tokens / per_step["ours"], 1),
        "ours_with_mtp_tokens_per_s": round(tokens / per_step["ours_with_mtp"], 1),
        "ratio_ours_vs_transformers": round(per_step["transformers"] / per_step["ours"], 3),
        # issue 22's MTP target: the step with the MTP depths at most 1.25x the step without
        "ratio_mtp_step_vs_without": round(per_step["ours_with_mtp"] / per_step["ours"], 3),
        "step_seconds": {name: [round(t, 4) for t in s] for name, s in seconds.items()},
    }
    if split_steps:
        result["split"] = {name: split_of(side, per_step[name], split_steps) for name, side in sides.items()}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_MODE", "disabled")
    main(sys.argv[1:])

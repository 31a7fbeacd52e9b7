"""Benchmark the rollout engine against transformers' `generate` on one model, in one run.

    python tools/bench_rollout.py --model DIR [--new-tokens 96] [--threads 1]
    python tools/bench_rollout.py --model DIR --backend vllm [--depths 0,3] [--stock-mtp]
    python tools/bench_rollout.py --train-demo DIR [--steps 400]

Prints one JSON object: tokens/s of transformers' MiMoV2FlashForCausalLM.generate (same
weights), of our engine at K = 0 (plain decoding) and K = 1..3 (MTP drafts), at batch 1 and
16, with accept lengths and the ratios, all from interleaved rounds of one process (medians,
so a busy machine biases every configuration alike). Greedy outputs are checked to be
identical across every configuration.

`--backend vllm` compares our engine with vLLM servers (.venv-vllm, one per depth K: vLLM
fixes K at start-up) on the same export, greedy, in interleaved rounds: tokens/s at each batch
and K, the ratio vLLM / ours, accept lengths (vLLM's from its Prometheus counters), and whether
the greedy outputs agree. The servers draft with our plugin's drafter (every MTP layer, as
trained: rollout/vllm_plugin/mimo_train_vllm/mtp.py); `--stock-mtp` adds vLLM's own (MTP layer 0
for every draft) at each K > 0. vLLM's figures include its HTTP round trips: that is what the RL
loop pays. The served weights pass through the same pieces weight streaming sends (on CPU with the
value heads padded to the q/k head dim, and the window vLLM needs: mimo_train/rollout/vllm/server.py).

Prompts: DIR/bench_prompts.json if present (a list of token-id lists, written by
--train-demo), else random tokens. `--train-demo DIR` trains the `small` preset (main model
and its 3 MTP layers, the training stack of tools/demo.py) on a periodic copy task -- a random
block of 16 tokens repeated -- and exports it in the serving format, with prompts of the same
task, so that the MTP layers have something to predict; run again on the same DIR to train on
(with --replicate-mtp: MTP layers 1.. restart as copies of layer 0, as MiMo's post-training does).

Why the demo replicates MTP layer 0 during training (issue 19): on this task an ideal predictor
scores 1.0 at every depth (each masked target's copy, one period back, is among what that depth
sees), and nothing in the model hides it (tests/model/test_mtp_targets.py). But each MTP layer
has to find its own copy circuit: its loss sits at ln 16 until it drops suddenly, at a step that is
luck of the seed. With the default seed depth 3 never drops in 400 steps, while depths 1 and 2 do
(and MTP layer 0's own weights do the job at every depth: vLLM's stock drafter, layer 0 for
every draft, accepts 4.000 of 4 at K = 3 in docs/vllm.md's table); with seed 1 depth 3 is the
first to learn. So once depth 1 has learned (acc/mtp_1 >= 0.5 on a training batch), the MTP layers
whose depth has not restart as copies of layer 0, with fresh optimizer state, and train on from
there. Held-out accuracy main / depth 1 / 2 / 3 (the JSON's `held_out`; CPU, commit 647771e,
`--train-demo DIR` plus the flags named):
  --replicate-mtp-at never   1.000 / 0.804 / 0.790 / 0.052 (chance 1/16)
  (default)                  1.000 / 0.801 / 0.792 / 0.775 (layer 2 replaced at step 219)
  --seed 1                   0.998 / 0.990 / 0.976 / 0.964 (nothing replaced)
With the default seed, depths 1-3 miss only targets in the second block (whose one copy is the
first block); the benchmark's prompts hold two blocks, so there the drafts are right: the third
draft is accepted 1.000 of the time, against 0.079 without the replication (`--model DIR
--depths 0,3 --batches 16 --rounds 1`, `acceptance_per_position` at K = 3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_env import commit, environment, sync  # noqa: E402

PERIOD, SEQ, SYMBOLS = 16, 96, 16


def periodic_batch(batch: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, SEQ] token ids: a random block of PERIOD tokens from [3, 3 + SYMBOLS), repeated
    (a few symbols, as tools/demo.py's copy task, so that a few hundred CPU steps learn it)."""
    block = torch.randint(3, 3 + SYMBOLS, (batch, PERIOD), generator=gen)
    return block.repeat(1, SEQ // PERIOD)


LEARNED = 0.5  # a depth whose training-batch accuracy reaches this has learned the copy (chance: 1/16)


def copy_mtp_layer0(model, layers, opt=None) -> None:
    """MTP layers `layers` become copies of layer 0 (MiMo's step before post-training). Their
    optimizer state is dropped: Adam's moments belong to the weights being replaced."""
    params, state = dict(model.named_parameters()), model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, t in state.items():
            if not name.startswith("mtp.layers.0.") or not isinstance(t, torch.Tensor):
                continue
            for k in layers:
                target = name.replace("mtp.layers.0.", f"mtp.layers.{k}.", 1)
                state[target].copy_(t)
                if opt is not None and target in params:
                    opt.state.pop(params[target], None)


def unlearned_mtp_layers(metrics: dict[str, float], depths: int) -> list[int]:
    """MTP layers 1.. whose depth has not learned yet, once depth 1 (MTP layer 0) has; else []."""
    if metrics.get("acc/mtp_1", 0.0) < LEARNED:
        return []
    return [k for k in range(1, depths) if metrics[f"acc/mtp_{k + 1}"] < LEARNED]


def depth_accuracy(model, device, sequences: int = 64) -> dict[str, float]:
    """Top-1 accuracy of each depth on fresh sequences of the task, over the training mask."""
    from mimo_train.training.loss import lm_loss

    ids = periodic_batch(sequences, torch.Generator().manual_seed(99)).to(device)
    labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    with torch.no_grad():
        _, metrics = lm_loss(model(ids, labels=labels, loss_mask=loss_mask(ids)), mtp_weight=0.0)
    return {k: round(v, 4) for k, v in metrics.items() if k.startswith("acc/")}


def loss_mask(ids: torch.Tensor) -> torch.Tensor:
    """The targets that can be predicted: from the second block on (depth k's mask is this one
    shifted k places left by the model: its targets too are from the second block on)."""
    mask = torch.zeros_like(ids, dtype=torch.float32)
    mask[:, PERIOD - 1:-1] = 1
    return mask


def train_demo(out: Path, steps: int, mtp_weight: float, replicate_mtp: bool, preset: str = "small",
               overrides: dict | None = None, progress: bool = True, replicate_when_learned: bool = True,
               seed: int = 0) -> dict:
    """Train `preset` on the periodic copy task and export it to `out` (see the module docstring).
    `replicate_mtp`: MTP layers 1.. start as copies of layer 0; `replicate_when_learned`: once
    depth 1 has learned, the MTP layers whose depth has not restart as copies of layer 0 (once)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from mimo_train.model.config import ModelConfig
    from mimo_train.model.gpt import build_model
    from mimo_train.model.hf_mapping import to_hf
    from mimo_train.parallel.setup import init_distributed
    from mimo_train.training.loss import lm_loss

    init_distributed(seed=seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # fp32 either way: a tiny model
    if (out / "config.json").exists():  # continue training an earlier run
        from mimo_train.model.load import load_hf

        handle = load_hf(out, device=device, dtype=torch.float32)
        cfg, model = handle.config, handle.model.train()
    else:
        cfg = ModelConfig.preset(preset, **(overrides or {}))
        model = build_model(cfg).to(device)
    if replicate_mtp:  # MiMo's post-training step: every MTP layer starts as a copy of layer 0
        copy_mtp_layer0(model, range(1, cfg.num_nextn_predict_layers))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    replicated = None  # (step, layers) once the MTP layers that had not learned were replaced
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps))
    gen = torch.Generator().manual_seed(seed)
    for step in (bar := tqdm(range(steps), desc=f"train {preset} on the periodic copy task", disable=not progress)):
        ids = periodic_batch(16, gen).to(device)
        labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
        loss, metrics = lm_loss(model(ids, labels=labels, loss_mask=loss_mask(ids)), mtp_weight=mtp_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if replicate_when_learned and replicated is None and (layers := unlearned_mtp_layers(
                metrics, cfg.num_nextn_predict_layers)):
            copy_mtp_layer0(model, layers, opt)
            replicated = {"step": step, "layers": layers}
        bar.set_postfix({k.split("/")[1]: f"{v:.2f}" for k, v in metrics.items() if k.startswith("acc/")})
    held_out = depth_accuracy(model.eval(), device)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out)
    state = {k: v.detach().cpu().contiguous() for k, v in to_hf(model.state_dict(), cfg).items()}
    save_file(state, str(out / "model.safetensors"))
    prompts = periodic_batch(16, torch.Generator().manual_seed(1234))[:, :2 * PERIOD]
    (out / "bench_prompts.json").write_text(json.dumps(prompts.tolist()))
    return {"trained": str(out), "steps": steps, "final": metrics, "held_out": held_out, "replicated_mtp_layer0": replicated}


def load_prompts(model_dir: Path, vocab: int, count: int, length: int) -> list[list[int]]:
    path = model_dir / "bench_prompts.json"
    if path.exists():
        prompts = json.loads(path.read_text())
    else:
        prompts = torch.randint(3, vocab, (count, length), generator=torch.Generator().manual_seed(0)).tolist()
    return (prompts * ((count + len(prompts) - 1) // len(prompts)))[:count]


def prompt_groups(prompts: list[list[int]], batch: int, batch1_prompts: int) -> list[list[list[int]]]:
    """Batch 1: the first few prompts one after another; batch b: b prompts in one call."""
    return [[p] for p in prompts[:batch1_prompts]] if batch == 1 else [prompts[:batch]]


def run_engine(engine, groups, params, depth: int):
    """Our engine over the groups: (token lists, seconds, Metrics of each call)."""
    texts, seconds, metrics = [], 0.0, []
    for group in groups:
        completions, m = engine.generate(group, params, depth=depth)
        texts += [c.tokens for c in completions]
        seconds += m.seconds
        metrics.append(m)
    return texts, seconds, metrics


def bench(args) -> dict:
    from transformers import AutoModelForCausalLM

    from mimo_train.rollout import Engine, EngineConfig, SamplingParams

    model_dir = Path(args.model)
    batches = [int(b) for b in args.batches.split(",")]
    depths = [int(k) for k in args.depths.split(",")]
    start = time.perf_counter()
    engine = Engine.from_pretrained(model_dir, EngineConfig(max_batch=max(batches), max_len=args.max_len))
    # The baseline on our engine's device and in its dtype (bf16 on a GPU, fp32 on CPU).
    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=engine.dtype)
    hf = hf.to(engine.device).eval()
    prompts = load_prompts(model_dir, hf.config.vocab_size, max(batches), args.prompt_len)
    depths = [k for k in depths if k <= engine.max_depth]
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.new_tokens, ignore_eos=True, seed=0)

    groups = lambda batch: prompt_groups(prompts, batch, args.batch1_prompts)  # noqa: E731

    def run_hf(batch: int, new_tokens: int | None = None):
        texts, seconds, new_tokens = [], 0.0, new_tokens or args.new_tokens
        for group in groups(batch):
            ids = torch.tensor(group, device=engine.device)
            t = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=args.temperature > 0,
                                  temperature=args.temperature or None, top_k=None, top_p=None, pad_token_id=0)
            sync(engine.device)
            seconds += time.perf_counter() - t
            texts += out[:, ids.shape[1]:].tolist()
        return texts, seconds, []

    configs = [(b, "hf_generate", None) for b in batches] + [(b, f"ours_k{k}", k) for b in batches for k in depths]
    # Warm-up of every configuration, the baseline's too, before any timing.
    for b, name, k in configs:
        if name == "hf_generate":
            run_hf(b, new_tokens=8)
        else:
            engine.generate(prompts[:b], SamplingParams(temperature=args.temperature, max_new_tokens=8, seed=0),
                            depth=k)
    warmup_s = time.perf_counter() - start
    speeds, outputs, accept = {}, {}, {}
    for _ in range(args.rounds):
        for b, name, k in configs:
            texts, seconds, metrics = run_hf(b) if name == "hf_generate" else run_engine(engine, groups(b), params, k)
            speeds.setdefault((b, name), []).append(sum(map(len, texts)) / seconds)
            outputs.setdefault((b, name), texts)
            accept.setdefault((b, name), []).extend(metrics)
    result = {"model": str(model_dir), **environment(engine.device, engine.dtype), "temperature": args.temperature,
              "prompt_len": len(prompts[0]), "new_tokens": args.new_tokens, "rounds": args.rounds,
              "batch1_prompts": args.batch1_prompts, "warmup_s": round(warmup_s, 1), "batches": {}}
    for b in batches:
        entry = {}
        for (bb, name), v in speeds.items():
            if bb != b:
                continue
            e = {"tokens_per_s": round(statistics.median(v), 2), "rounds": [round(x, 2) for x in v]}
            ms = accept[(b, name)]
            if ms:  # per verify step: tokens kept per row, and how often draft j was accepted
                row_steps = [m.row_steps for m in ms]
                e["mean_accept_length"] = round(sum(m.mean_accept_length * r for m, r in zip(ms, row_steps))
                                                / sum(row_steps), 3)
                e["acceptance_per_position"] = [round(sum(m.acceptance_per_position[j] * r for m, r in
                                                          zip(ms, row_steps)) / sum(row_steps), 3)
                                                for j in range(len(ms[0].acceptance_per_position))]
            entry[name] = e
        base = entry["hf_generate"]["tokens_per_s"]
        k0 = entry.get("ours_k0", {}).get("tokens_per_s")
        entry["ratios"] = {f"{name}_over_hf": round(e["tokens_per_s"] / base, 2) for name, e in entry.items()
                           if name.startswith("ours")}
        if k0:
            entry["ratios"].update({f"{name}_over_k0": round(e["tokens_per_s"] / k0, 2) for name, e in entry.items()
                                    if name.startswith("ours_k") and name != "ours_k0"})
        if args.temperature == 0:
            ref = outputs[(b, "hf_generate")]
            entry["greedy_outputs_equal_hf"] = all(outputs[(b, n)] == ref for (bb, n) in outputs if bb == b)
        result["batches"][str(b)] = entry
    return result


def bench_vllm(args) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import save_file

    from mimo_train import load_hf
    from mimo_train.rl.weight_stream import serving_tensors
    from mimo_train.rollout import Engine, EngineConfig, SamplingParams
    from mimo_train.rollout.vllm.client import VLLMClient, spec_delta
    from mimo_train.rollout.vllm.server import ServerSpec, ServingGeometry, VLLMServer, write_model_dir
    from mimo_train.training.config import ROOT

    model_dir = Path(args.model)
    handle = load_hf(model_dir, device="cpu")
    cfg, cuda = handle.config, torch.cuda.is_available()
    geometry = ServingGeometry.for_device(cfg, cuda=cuda)
    work = Path(args.work or model_dir.parent / (model_dir.name + "-vllm"))
    tokenizer = model_dir
    if not (model_dir / "tokenizer.json").exists():  # --train-demo models have none; vLLM loads one anyway
        from mimo_train.data.tokenizer import build_tokenizer

        tokenizer = work / "tokenizer"
        build_tokenizer(tokenizer)
    served = write_model_dir(work / "model", cfg, tokenizer, pad_v_head=geometry.pad_v_head)
    save_file(serving_tensors([handle.model], cfg, geometry=geometry), str(served / "model.safetensors"))
    batches = [int(b) for b in args.batches.split(",")]
    depths = [int(k) for k in args.depths.split(",") if int(k) <= cfg.num_nextn_predict_layers]
    # vLLM with our plugin's drafter (every MTP layer, chained) and, with --stock-mtp, vLLM's own
    # (MTP layer 0 for every draft) beside it.
    kinds = [(k, False) for k in depths] + ([(k, True) for k in depths if k > 0] if args.stock_mtp else [])
    servers = {(k, stock): VLLMServer(ServerSpec(
        python=str(ROOT / ".venv-vllm" / "bin" / "python"), model=served, port=0,
        log=work / f"server_k{k}{'_stock' if stock else ''}.log", dtype="bfloat16" if cuda else "float32",
        max_model_len=args.max_len, max_num_seqs=max(batches), spec_depth=k, kv_cache_bytes=None if cuda else 1 << 30,
        dummy_weights=False, stock_mtp=stock)).start() for k, stock in kinds}
    try:
        for server in servers.values():
            server.wait_ready(600)
        clients = {key: VLLMClient(s.url, describe=s.describe()) for key, s in servers.items()}
        engine = Engine.from_pretrained(model_dir, EngineConfig(max_batch=max(batches), max_len=args.max_len))
        prompts = load_prompts(model_dir, cfg.vocab_size, max(batches), args.prompt_len)
        params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, ignore_eos=True)
        groups = lambda b: prompt_groups(prompts, b, args.batch1_prompts)  # noqa: E731

        def ours(batch: int, k: int):
            texts, seconds, metrics = run_engine(engine, groups(batch), params, k)
            return texts, seconds, [(m.mean_accept_length, m.row_steps) for m in metrics]

        def theirs(batch: int, k: int, stock: bool = False):
            client, texts, seconds, accept = clients[(k, stock)], [], 0.0, []
            for group in groups(batch):
                before = [client.spec_counters()]
                t = time.perf_counter()
                with ThreadPoolExecutor(len(group)) as pool:
                    texts += [s.tokens for s in pool.map(lambda p: client.complete(p, params, None), group)]
                seconds += time.perf_counter() - t
                drafts, accept_length, _ = spec_delta(before, [client.spec_counters()])
                accept.append((accept_length, drafts))
            return texts, seconds, accept

        runs = {"ours": ours, "vllm": theirs, "vllm_stock": lambda b, k: theirs(b, k, stock=True)}
        which = lambda k: [n for n in runs if n != "vllm_stock" or (k, True) in clients]  # noqa: E731
        for b in batches:  # warm-up
            for k in depths:
                for name in which(k):
                    runs[name](b, k)
        speeds, outputs, accepts = {}, {}, {}
        for _ in range(args.rounds):
            for b in batches:
                for k in depths:
                    for name in which(k):
                        texts, seconds, accept = runs[name](b, k)
                        speeds.setdefault((b, k, name), []).append(sum(map(len, texts)) / seconds)
                        outputs.setdefault((b, k, name), texts)
                        accepts.setdefault((b, k, name), []).extend(accept)
    finally:
        for server in servers.values():
            server.stop()
    result = {"model": str(model_dir), "device": "cuda" if cuda else "cpu", "dtype": "bfloat16" if cuda else "float32",
              "threads_ours": torch.get_num_threads(), "cpu_count": os.cpu_count(), "new_tokens": args.new_tokens,
              "prompt_len": len(prompts[0]), "rounds": args.rounds, "batch1_prompts": args.batch1_prompts,
              "padded_v_head": geometry.pad_v_head, "commit": commit(), "batches": {}}
    for b in batches:
        entry = {}
        for k in depths:
            for name in which(k):
                acc = accepts[(b, k, name)]
                steps = sum(n for _, n in acc)
                entry[f"{name}_k{k}"] = {"tokens_per_s": round(statistics.median(speeds[(b, k, name)]), 2),
                                         "rounds": [round(x, 2) for x in speeds[(b, k, name)]],
                                         "mean_accept_length": round(sum(a * n for a, n in acc) / steps, 3) if steps else 1.0}
            entry[f"vllm_over_ours_k{k}"] = round(entry[f"vllm_k{k}"]["tokens_per_s"] / entry[f"ours_k{k}"]["tokens_per_s"], 2)
            entry[f"greedy_outputs_equal_k{k}"] = all(outputs[(b, k, "ours")] == outputs[(b, k, n)] for n in which(k))
        result["batches"][str(b)] = entry
    return result


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="serving-format model directory")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="what our engine is measured against: transformers' generate, or vLLM servers")
    p.add_argument("--work", help="--backend vllm: directory for the served model and the servers' logs")
    p.add_argument("--stock-mtp", action="store_true",
                   help="--backend vllm: also run vLLM's own MTP drafter (layer 0 for every draft) at each K > 0")
    p.add_argument("--train-demo", help="train the small preset's MTP demo model into this directory")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--mtp-weight", type=float, default=0.3, help="weight of the mean MTP loss (training)")
    p.add_argument("--replicate-mtp", action="store_true", help="start MTP layers 1.. as copies of layer 0")
    p.add_argument("--replicate-mtp-at", choices=["learned", "never"], default="learned",
                   help="'learned': once depth 1 has learned, MTP layers whose depth has not restart as copies "
                        "of layer 0 (else depth 3 stays at chance in 400 steps); 'never': train them as they are")
    p.add_argument("--seed", type=int, default=0, help="training: seed of the initialisation and the data")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32, help="random prompts only")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--depths", default="0,1,2,3")
    p.add_argument("--batch1-prompts", type=int, default=4, help="prompts run one by one at batch 1")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP spin on a busy machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.train_demo:
        print(json.dumps(train_demo(Path(args.train_demo), args.steps, args.mtp_weight, args.replicate_mtp,
                                    replicate_when_learned=args.replicate_mtp_at == "learned", seed=args.seed)))
        return
    if not args.model:
        p.error("--model DIR (or --train-demo DIR) is required")
    print(json.dumps(bench_vllm(args) if args.backend == "vllm" else bench(args), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])

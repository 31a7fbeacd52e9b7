"""Seconds from starting a vLLM server to its first answer on /health, with its one worker inside
the engine core (ours, `ServerSpec.worker_in_engine`) and in a process of its own (vLLM's CPU
default, `worker_process=True`), in one run.

    python tools/bench_vllm_start.py [--rounds 3] [--threads 1]

The `tiny` model with head dim 32 (vLLM's CPU attention), dummy weights, eager; the two layouts
start in turn, one at a time, `--rounds` times each (a load that comes and goes hits both alike).
Prints one JSON document: every start's seconds, the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_env import environment  # noqa: E402

LAYOUTS = {"worker_in_engine": False, "worker_process": True}  # name: ServerSpec.worker_process


def start_once(root: Path, model: Path, worker_process: bool, threads: int) -> float:
    from mimo_train.rl.config import VLLMConfig
    from mimo_train.rollout.vllm.server import VLLMServer

    # As a run builds its servers' spec (rollout.vllm defaults: 0.25 GB of KV cache, eager, fp32).
    spec = VLLMConfig(cpu_threads=threads).server_spec(
        cuda=False, model=model, port=0, log=root / f"worker_process_{worker_process}.log", max_model_len=256,
        max_num_seqs=32, worker_process=worker_process)
    t0 = time.perf_counter()
    server = VLLMServer(spec).start()
    try:
        server.wait_ready(600)
        return time.perf_counter() - t0
    finally:
        server.stop()


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="rollout.vllm.cpu_threads of both (0: every core)")
    args = parser.parse_args(argv)

    from mimo_train.model.config import ModelConfig
    from mimo_train.rollout.vllm.server import write_model_dir
    from tools.make_data import make

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make(root / "data", kind="sft", domains=["sort"], n=10, n_eval=2, seed=0)
        cfg = ModelConfig.preset("tiny", num_key_value_heads=2, head_dim=32, swa_head_dim=32)
        model = write_model_dir(root / "model", cfg, root / "data" / "tokenizer", pad_v_head=True)
        seconds = {name: [] for name in LAYOUTS}
        for _ in range(args.rounds):
            for name, worker_process in LAYOUTS.items():
                seconds[name].append(round(start_once(root, model, worker_process, args.threads), 2))
    median = {name: statistics.median(s) for name, s in seconds.items()}
    out = {"seconds": seconds, "median_s": median,
           "ratio_in_engine_vs_worker_process": round(median["worker_in_engine"] / median["worker_process"], 3),
           "rounds": args.rounds, "cpu_threads": args.threads, **environment("cpu", "float32")}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

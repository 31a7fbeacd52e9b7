"""Weight sync per update, gather-to-rank-0 vs streaming, for models of growing size, in one run.

    torchrun --nproc-per-node 2 tools/bench_weight_sync.py [--sizes s,m,l] [--tp 2] [--bucket-mb 16]

Both ranks hold a tensor-parallel model. *gather* is what the in-process engine gets: every
weight gathered to rank 0 in fp32 (`rl/weight_gather.py`). *stream* is what vLLM gets: every
rank sends the pieces it owns, in buckets, into a real vLLM server (`rl/vllm_weight_sync.py`),
which loads them. For each: seconds per update (median of --repeats, after one warm-up) and the
peak memory each rank holds beyond its model while it runs (RSS sampled every 2 ms). Prints one
JSON document (rank 0), with the ratios stream / gather. Model sizes use head dim 64 so that
vLLM's CPU attention takes them. Large allocations are mmapped at a fixed threshold (mallopt),
so that a freed buffer leaves the process instead of staying in glibc's heap and in the RSS.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_env import environment  # noqa: E402

SIZES = {  # overrides of the `tiny` preset
    "s": dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, n_routed_experts=8),
    "m": dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=512, n_routed_experts=16),
    "l": dict(hidden_size=1024, intermediate_size=2048, moe_intermediate_size=1024, n_routed_experts=16),
}
HEADS = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64, v_head_dim=64, swa_num_attention_heads=4,
             swa_num_key_value_heads=2, swa_head_dim=64, swa_v_head_dim=64,
             partial_rotary_factor=0.25, num_nextn_predict_layers=0)  # MTP off: both paths move the same tensors


def exact_rss() -> None:
    """Make RSS follow live memory: allocations of 128 KiB and more are mmapped and returned to
    the system when freed (glibc otherwise raises that threshold as buffers are freed and keeps
    up to twice a freed buffer in its heap)."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD, which also fixes it


class PeakRSS:
    """The most memory this process held above its level at the start, sampled every 2 ms."""

    def __enter__(self):
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.proc, self.base, self.peak, self.running = psutil.Process(), psutil.Process().memory_info().rss, 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss - self.base)


def measure(fn, repeats: int) -> dict:
    fn()  # warm-up
    seconds, peaks = [], []
    for _ in range(repeats):
        dist.barrier()
        with PeakRSS() as rss:
            t = time.perf_counter()
            fn()
            dist.barrier()
            seconds.append(time.perf_counter() - t)
        peaks.append(rss.peak)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, max(peaks))
    return {"seconds": round(statistics.median(seconds), 3), "peak_extra_mb_per_rank": [round(p / 2**20, 1) for p in every]}


def main(argv: list[str]) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="s,m,l")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--bucket-mb", type=float, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    exact_rss()

    from mimo_train.convert.names import hf_shapes
    from mimo_train.model.config import ModelConfig
    from mimo_train.model.gpt import build_model
    from mimo_train.model.spec import MegatronOptions
    from mimo_train.parallel.rank0 import on_rank0
    from mimo_train.parallel.setup import init_distributed
    from mimo_train.rl.vllm_weight_sync import VLLMWeightSync
    from mimo_train.rl.weight_gather import gather_serving_weights
    from mimo_train.rl.weight_stream import MegatronWeights
    from mimo_train.rollout.vllm.client import VLLMClient
    from mimo_train.rollout.vllm.server import ServerSpec, VLLMServer, write_model_dir
    from mimo_train.training.config import ROOT

    init_distributed(tp=a.tp, seed=0)
    rank = dist.get_rank()
    work = Path(tempfile.mkdtemp(prefix="bench_weight_sync_")) if rank == 0 else None
    results = {"world_size": dist.get_world_size(), "tp": a.tp, "bucket_mb": a.bucket_mb, "repeats": a.repeats,
               **environment("cpu", "float32"), "sizes": {}}
    for name in a.sizes.split(","):
        cfg = ModelConfig.preset("tiny", **HEADS, **SIZES[name])
        model = build_model(cfg, MegatronOptions(tp=a.tp, sequence_parallel=a.tp > 1))
        params = sum(t.numel() for t in model.parameters())
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, params)
        server = None

        def start():
            nonlocal server
            from mimo_train.data.tokenizer import build_tokenizer

            tok = work / name / "tokenizer"
            build_tokenizer(tok)
            model_dir = write_model_dir(work / name / "model", cfg, tok, pad_v_head=False)
            server = VLLMServer(ServerSpec(python=str(ROOT / ".venv-vllm" / "bin" / "python"), model=model_dir,
                                           port=0, log=work / name / "server.log", max_model_len=64,
                                           kv_cache_bytes=64 << 20)).start()
            server.wait_ready(600)
            return None

        try:
            on_rank0(start, share=False)
            clients = [VLLMClient(server.url)] if rank == 0 else []
            sync = VLLMWeightSync(clients, MegatronWeights(cfg, torch.float32), drafter=False,
                                  bucket_bytes=int(a.bucket_mb * 2**20))
            stream = measure(lambda: sync.push([model], version=1), a.repeats)
            gather = measure(lambda: gather_serving_weights([model], cfg), a.repeats)
        finally:
            on_rank0(lambda: server and server.stop(), share=False)
        full_mb = sum(math.prod(shape) for shape in hf_shapes(cfg, mtp=False).values()) * 4 / 2**20
        results["sizes"][name] = {
            "parameters": sum(every), "serving_mb_fp32": round(full_mb, 1), "gather": gather, "stream": stream,
            "stream_over_gather_seconds": round(stream["seconds"] / gather["seconds"], 2),
            "stream_over_gather_peak_rank0": round(stream["peak_extra_mb_per_rank"][0] /
                                                   max(gather["peak_extra_mb_per_rank"][0], 1e-9), 3)}
    if rank == 0:
        print(json.dumps(results, indent=2))
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

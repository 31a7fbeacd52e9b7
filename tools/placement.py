"""The arithmetic of a MOPD placement (docs/placement.md): memory per GPU of the trainer, the
rollout servers and the teachers, and the bytes and time of one weight sync, from the model's
shapes (no model is built).

    python tools/placement.py                                 # MiMo-V2-Flash, the layout of docs/placement.md
    python tools/placement.py --trainer-gpus 64 --pp 4 --ep 16 --servers 2

Prints one JSON object. Assumptions, each a flag: bf16 weights, fp32 gradients and megatron's
distributed optimizer (fp32 master weights and Adam moments, 12 bytes per parameter, sharded over
the data-parallel group of each parameter), 8 GPUs of 141 GB (H200) per node, one 400 Gb/s NIC
per GPU, and the weight-sync protocol of this repository (every server worker receives every
weight: `mimo_train_vllm.wire`) next to a shard-aware one (each worker receives its slice).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GB = 1e9


def parameters(model: str) -> dict[str, float]:
    """Parameters by kind: routed experts, the rest of the main model, the MTP layers."""
    from mimo_train.convert.names import hf_shapes
    from mimo_train.model.config import ModelConfig

    cfg = ModelConfig.preset(model)
    out = {"experts": 0, "dense": 0, "mtp": 0}
    for name, shape in hf_shapes(cfg, mtp=True).items():
        kind = "mtp" if ".mtp." in name else "experts" if ".experts." in name else "dense"
        out[kind] += math.prod(shape)
    out["total"] = sum(out.values())
    return out


def kv_bytes_per_sequence(model: str, tokens: int, dtype_bytes: int = 2) -> float:
    """KV cache of one sequence: global layers keep every token, SWA layers their window."""
    from mimo_train.model.config import ModelConfig

    cfg = ModelConfig.preset(model)
    total = 0
    for i in range(cfg.num_hidden_layers):
        d = cfg.attention_dims(swa=cfg.is_swa(i))
        kept = min(tokens, cfg.sliding_window_size + 1) if cfg.is_swa(i) else tokens
        total += kept * d["num_kv_heads"] * (d["head_dim"] + d["v_head_dim"]) * dtype_bytes
    return total


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mimo_v2_flash")
    p.add_argument("--gpu-gb", type=float, default=141.0, help="memory of one GPU (H200: 141 GB)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nic-gbps", type=float, default=400.0, help="network per GPU, Gb/s")
    p.add_argument("--trainer-gpus", type=int, default=128)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--ep", type=int, default=32)
    p.add_argument("--servers", type=int, default=4, help="rollout servers")
    p.add_argument("--server-gpus", type=int, default=8, help="GPUs per rollout server (TP x EP inside it)")
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--teacher-gpus", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32768, help="tokens of the longest rollout sequence")
    p.add_argument("--vllm-memory-share", type=float, default=0.9, help="vLLM's gpu_memory_utilization")
    a = p.parse_args(argv)

    n = parameters(a.model)
    main_params = n["experts"] + n["dense"]
    dp_dense = a.trainer_gpus // (a.tp * a.pp)
    dp_expert = a.trainer_gpus // (a.ep * a.pp)
    if dp_dense * a.tp * a.pp != a.trainer_gpus or dp_expert * a.ep * a.pp != a.trainer_gpus:
        raise SystemExit(f"--trainer-gpus {a.trainer_gpus} is not a multiple of tp x pp and ep x pp")
    # Per GPU: bf16 weight + fp32 grad (6 bytes) on its shard, 12 bytes of optimizer state over the DP group.
    expert_shard = n["experts"] / (a.pp * a.ep)
    dense_shard = (n["dense"] + n["mtp"]) / (a.pp * a.tp)
    trainer_gb = (expert_shard * (6 + 12 / dp_expert) + dense_shard * (6 + 12 / dp_dense)) / GB

    weights_gb = (main_params + n["mtp"]) * 2 / GB  # bf16, the drafter's MTP layers included
    server_gb = a.server_gpus * a.gpu_gb * a.vllm_memory_share
    kv_gb = server_gb - weights_gb
    seq_gb = kv_bytes_per_sequence(a.model, a.seq_len) / GB
    teacher_weights_gb = main_params * 2 / GB

    nic = a.nic_gbps / 8  # GB/s per GPU
    workers = a.servers * a.server_gpus
    every_worker_gb = weights_gb * workers  # this repository's protocol: each worker receives every weight
    sharded_gb = weights_gb * a.servers  # shard-aware: each worker its slice
    sync = {
        "bytes_per_step_gb": {"every_worker_gets_all": round(every_worker_gb), "shard_aware": round(sharded_gb)},
        # Bounded by the receiving NIC (each worker's share) or by the trainer's total egress.
        "seconds_at_line_rate": {
            "every_worker_gets_all": round(max(weights_gb / nic, every_worker_gb / (a.trainer_gpus * nic)), 1),
            "shard_aware": round(max(weights_gb / a.server_gpus / nic, sharded_gb / (a.trainer_gpus * nic)), 2)},
    }
    out = {
        "model": a.model,
        "parameters_billion": {k: round(v / 1e9, 2) for k, v in n.items()},
        "trainer": {"gpus": a.trainer_gpus, "nodes": a.trainer_gpus / a.gpus_per_node, "tp": a.tp, "pp": a.pp,
                    "ep": a.ep, "dp_dense": dp_dense, "dp_expert": dp_expert,
                    "weights_grads_optimizer_gb_per_gpu": round(trainer_gb, 1),
                    "left_for_activations_gb_per_gpu": round(a.gpu_gb - trainer_gb, 1)},
        "rollout": {"servers": a.servers, "gpus_per_server": a.server_gpus, "weights_gb_per_server": round(weights_gb),
                    "weights_gb_per_gpu": round(weights_gb / a.server_gpus, 1),
                    "kv_cache_gb_per_server": round(kv_gb), "kv_gb_per_sequence": round(seq_gb, 3),
                    "sequences_of_seq_len_per_server": int(kv_gb / seq_gb) if kv_gb > 0 else 0},
        "teachers": {"servers": a.teachers, "gpus_per_server": a.teacher_gpus,
                     "weights_gb_per_gpu": round(teacher_weights_gb / a.teacher_gpus, 1),
                     "left_per_gpu_gb": round(a.gpu_gb * a.vllm_memory_share - teacher_weights_gb / a.teacher_gpus, 1)},
        "weight_sync": sync,
        "nodes_total": (a.trainer_gpus + workers + a.teachers * a.teacher_gpus) / a.gpus_per_node,
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()

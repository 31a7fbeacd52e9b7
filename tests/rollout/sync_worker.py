"""A trainer rank and an engine rank on gloo: weights broadcast under serving names.

Started by tests/rollout/test_weight_sync.py through torch.multiprocessing (spawn)."""

import torch
import torch.distributed as dist

from mimo_train.model.config import ModelConfig
from mimo_train.model.hf_mapping import WeightNameError
from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from mimo_train.rollout.weight_sync import receive_weights, send_weights


def run(rank: int, port: int, data_path: str, out_path: str) -> None:
    torch.set_num_threads(1)  # two processes on a small machine: no OpenMP spin-waiting
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    data = torch.load(data_path)
    if rank == 0:  # the trainer: a good update, then one with a wrong name and a wrong shape
        send_weights(data["new"], src=0, version=7, bucket_bytes=1 << 16)
        bad = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3), "model.not_a_weight": torch.zeros(2)}
        send_weights(bad, src=0)
    else:  # the engine
        engine = Engine(ModelConfig.from_hub_dict(data["config"]), data["base"], EngineConfig(device="cpu", max_batch=2, max_len=128))
        version = receive_weights(engine, src=0)
        try:
            receive_weights(engine, src=0)
            error = None
        except WeightNameError as e:
            error = str(e)
        completions, _ = engine.generate(data["prompts"], SamplingParams(temperature=0.0, max_new_tokens=24), depth=2)
        torch.save({"version": version, "error": error, "tokens": [c.tokens for c in completions],
                    "policy_versions": [c.policy_version for c in completions]}, out_path)
    dist.barrier()
    dist.destroy_process_group()

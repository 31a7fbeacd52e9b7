"""The trainer side of tests/rl/test_vllm_deepspeed.py: a DeepSpeed ZeRO-3 engine on two ranks
streams its weights into a running vLLM server.

    torchrun --nproc-per-node 2 tests/rl/zero_stream_worker.py OUT STUDENT DATA URL BUCKET_MB

Each rank builds the run's DeepSpeedTrainer under ZeRO-3, with every parameter partitioned over
both ranks (DeepSpeed keeps parameters under 1e5 elements whole by default, which would be all
of a tiny model's; a large model's are partitioned, and so are these), and the run's VLLMRollout
on the server at URL. Rank 0 moves every weight away from the student's files (seeded noise,
written back to both ranks' partitions by ZeRO); then every rank pushes. Rank 0 writes to OUT:
the engine's weights as ZeRO holds them (gathered whole: the test's reference), the server's
log-probs of OUT/seq.json, and every rank's push statistics with the most parameter bytes a
gather held at once.
"""

import json
import sys
from pathlib import Path

import torch


def main(out: Path, student: str, data: str, url: str, bucket_mb: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import save_file

    from mimo_train.parallel.setup import init_distributed
    from mimo_train.rl import zero_weights
    from mimo_train.rl.vllm_rollout import VLLMRollout
    from mimo_train.training.config import load_config
    from mimo_train.training.deepspeed_trainer import DeepSpeedTrainer

    # DeepSpeed keeps parameters under 1e5 elements whole by default (all of a tiny model's): partition every one.
    config = load_config(["recipe=grpo", "trainer=deepspeed", f"trainer.model_dir={student}", "trainer.zero_stage=3",
                          "+trainer.ds_config.zero_optimization.stage3_param_persistence_threshold=0",
                          "rollout=vllm", f"rollout.vllm.urls=['{url}']", f"rollout.vllm.bucket_mb={bucket_mb}",
                          "train.steps=2", "train.global_batch=8", "train.micro_batch=4", "rl.prompts_per_step=4",
                          "rl.group_size=2", "optim.warmup_steps=0", f"rl.prompts={data}/train.jsonl",
                          f"data.tokenizer={data}/tokenizer", f"logging.run_dir={out}/run", "logging.progress=false",
                          "logging.plot=false"])
    init_distributed(seed=0)
    rank = dist.get_rank()
    trainer = DeepSpeedTrainer(config, layout=None)
    module = trainer.engine.module
    params = list(module.parameters())
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params), "expected ZeRO-3 partitioned parameters"

    with torch.no_grad(), deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        if rank == 0:  # only rank 0's values count: ZeRO re-partitions them to both ranks on exit
            g = torch.Generator().manual_seed(0)
            for p in params:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)

    largest_gather = [0]  # the real gather, counted: the most parameter bytes held at once
    real_gathered = zero_weights.gathered

    def counting(group):
        largest_gather[0] = max(largest_gather[0], sum(p.ds_numel * p.element_size() for p in group))
        return real_gathered(group)

    zero_weights.gathered = counting
    rollout = VLLMRollout(config, max_len=64)
    try:
        stats = rollout.push_weights(trainer.model, version=1)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, {**stats, "largest_gather_bytes": largest_gather[0]})
        with torch.no_grad(), deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            engine = {n: p.detach().clone() for n, p in module.named_parameters()} if rank == 0 else None
        if rank == 0:
            save_file(engine, str(out / "engine.safetensors"))
            seq = json.loads((out / "seq.json").read_text())
            rows = rollout.clients[0].prompt_logprobs([seq])[0]
            served = [rows[i][tok][0] for i, tok in enumerate(seq[1:])]
            total = sum(p.ds_numel * p.element_size() for p in params)
            (out / "result.json").write_text(json.dumps({"served": served, "ranks": everyone, "model_bytes": total}))
    finally:
        rollout.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:6])

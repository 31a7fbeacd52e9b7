"""Both sides of tests/rl/test_weight_stream.py's multi-process case.

    torchrun --nproc-per-node 2 tests/rl/stream_worker.py send PORT DIR    # the trainer ranks
    python tests/rl/stream_worker.py receive PORT DIR                      # a worker (rank 2)
    python tests/rl/stream_worker.py memory 0 -                            # one rank's peak memory

For each layout (TP=2, EP=2, PP=2) the trainer ranks build the same randomised tiny model, plan
the stream, put the manifest in the transfer group's store and send their buckets; the receiver
rebuilds the tensors with `wire.receive` and saves them, rank 0 saves what the gather path
gives, and the test compares the two.
"""

import json
import sys
import warnings
from pathlib import Path

import torch

LAYOUTS = {"tp2": dict(tp=2), "ep2": dict(ep=2), "pp2": dict(pp=2)}
BOUND = 8192


def send(port: int, out: Path) -> None:
    import torch.distributed as dist

    from mimo_train.model.config import ModelConfig
    from mimo_train.model.gpt import build_model
    from mimo_train.model.spec import MegatronOptions
    from mimo_train.parallel.setup import init_distributed
    from mimo_train.rl.weight_gather import gather_serving_weights
    from mimo_train.rl.weight_stream import PieceStream, local_pieces, plan_stream, send_buckets
    from mimo_train_vllm import wire

    init_distributed()
    rank = dist.get_rank()
    link = wire.Link("127.0.0.1", port, rank, 3)
    for name, layout in LAYOUTS.items():
        init_distributed(**layout, seed=0)
        cfg = ModelConfig.preset("tiny", num_key_value_heads=2, swa_num_key_value_heads=2)
        model = build_model(cfg, MegatronOptions(**layout, sequence_parallel=layout.get("tp", 1) > 1))
        with torch.no_grad():
            for p in model.parameters():  # each rank its own values: every shard distinct
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(rank * 1000 + p.numel()))
        pieces = local_pieces([model], cfg, dtype=torch.float32)
        plan = plan_stream(pieces, BOUND)
        if rank == 0:
            link.store.set(f"manifest/{name}", json.dumps([b.to_json() for b in plan.main + plan.draft]))
        largest = send_buckets(PieceStream(plan, pieces), plan.main + plan.draft, rank, [(link, [2])])
        gathered = gather_serving_weights([model], cfg)
        if rank == 0:
            torch.save(gathered, out / f"{name}.gathered.pt")
        sizes = [None, None]
        dist.all_gather_object(sizes, largest)
        if rank == 0:
            (out / f"{name}.stats.json").write_text(json.dumps({"largest": max(sizes), "bound": BOUND}))
    dist.barrier()
    dist.destroy_process_group()


def receive(port: int, out: Path) -> None:
    from mimo_train_vllm import wire

    link = wire.Link("127.0.0.1", port, 2, 3)
    for name in LAYOUTS:
        buckets = [wire.Bucket.from_json(b) for b in json.loads(link.store.get(f"manifest/{name}"))]
        got = {}
        wire.receive(link, buckets, lambda n, t: got.__setitem__(n, t.clone()))
        torch.save(got, out / f"{name}.received.pt")


def memory(port: int, out) -> None:
    """Peak memory of packing every bucket of bench_weight_sync's model "s" (one process, no
    sending): printed as JSON."""
    from mimo_train.model.config import ModelConfig
    from mimo_train.model.gpt import build_model
    from mimo_train.parallel.setup import init_distributed
    from mimo_train.rl.weight_stream import PieceStream, local_pieces, plan_stream, send_buckets
    from tests.training.runs import tool

    bench = tool("bench_weight_sync")
    bench.exact_rss()
    init_distributed()
    cfg = ModelConfig.preset("tiny", **bench.HEADS, **bench.SIZES["s"])
    model = build_model(cfg)
    pieces = local_pieces([model], cfg, dtype=torch.float32)
    bound = 4 << 20
    plan = plan_stream(pieces, bound)
    with bench.PeakRSS() as rss:
        largest = send_buckets(PieceStream(plan, pieces), plan.main + plan.draft, rank=0, targets=[])
    print(json.dumps({"peak": rss.peak, "bound": bound, "largest": largest, "plan_bytes": plan.nbytes}))


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    role, port, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    {"send": send, "receive": receive, "memory": memory}[role](port, out)

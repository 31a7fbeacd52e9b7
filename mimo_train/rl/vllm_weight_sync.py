"""Weight sync into vLLM servers: the trainer's side of our transfer engine (mimo_train_vllm).

Every trainer rank joins one transfer group per server (trainer ranks first, then the server's
workers) and, per update, streams what its trainer's weight source gives it (`weight_stream`:
megatron's shards, or a DeepSpeed engine's parameters, `zero_weights`): the target model, then
the MTP layers into vLLM's drafter. Rank 0 drives vLLM's RL routes around the data: pause
(in-flight requests finish, KV and prefix caches are dropped), start / update / finish for each
of the two models, resume. The update request carries the manifest, so the workers know what
to receive from whom; it returns when they have loaded everything. Every server is updated in
the same round: each bucket is packed once and sent to the workers of every server before the
next is made, so the memory a rank adds is one bucket whatever the number of servers.
"""

from __future__ import annotations

import threading
import time

import torch
import torch.distributed as dist

from mimo_train.parallel.rank0 import on_rank0
from mimo_train.rl.weight_stream import Stream, WeightSource, send_buckets
from mimo_train.rollout.vllm.server import free_port
from mimo_train_vllm import wire


class VLLMWeightSync:
    def __init__(self, clients, source: WeightSource, *, drafter: bool, bucket_bytes: int, host: str = "127.0.0.1",
                 timeout_s: float = 300.0):
        """Every rank; `clients` (VLLMClient per server) matter on rank 0 only. `source`: where the
        trainer's weights come from (`weight_stream.MegatronWeights`, `zero_weights.ZeroWeights`)."""
        self.clients, self.source = clients, source
        self.drafter, self.bucket_bytes = drafter, bucket_bytes
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.links: list[wire.Link] = []
        self.workers: list[list[int]] = []  # each server's ranks in its group
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        topology = on_rank0(lambda: [(c.world_size(), free_port(host)) for c in clients])
        for i, (workers, port) in enumerate(topology):
            size = self.world + workers
            box: dict = {}
            thread = None
            if self.rank == 0:  # the workers wait in the rendezvous until the trainer ranks join
                info = {"master_address": host, "master_port": port, "rank_offset": self.world, "world_size": size,
                        "backend": backend, "timeout_s": timeout_s}
                thread = _start(box, clients[i].init_weight_transfer, info)
            self.links.append(wire.Link(host, port, self.rank, size, backend=backend, timeout_s=timeout_s))
            self.workers.append(list(range(self.world, size)))
            on_rank0(lambda: _join(thread, box), share=False)

    def push(self, model_chunks, version: int, *, draft_only: bool = False) -> dict:
        """Every rank: this rank's weights into every server; the servers' policy version becomes
        `version`. Returns what was sent (bytes, the largest bucket, seconds)."""
        t0 = time.time()
        stream = self.source.open(model_chunks, self.bucket_bytes)
        plan = stream.plan
        rounds = ([] if draft_only else [(False, plan.main)]) + ([(True, plan.draft)] if self.drafter and plan.draft
                                                                 else [])
        on_rank0(lambda: [c.pause() for c in self.clients], share=False)
        largest = 0
        for draft, buckets in rounds:
            largest = max(largest, self._round(draft, buckets, stream, version))
        on_rank0(lambda: [c.resume() for c in self.clients], share=False)
        return {"sync/bytes": plan.nbytes, "sync/largest_bucket_bytes": largest,
                "sync/buckets": len(plan.main) + len(plan.draft), "time/sync_stream": time.time() - t0}

    def _round(self, draft: bool, buckets: list[wire.Bucket], stream: Stream, version: int) -> int:
        """One model (target or drafter) into every server: returns the largest bucket this rank sent."""
        on_rank0(lambda: [c.start_weight_update(draft=draft) for c in self.clients], share=False)
        updates = []
        if self.rank == 0:  # the workers receive while we send: each call returns when they have loaded it all
            manifest = [b.to_json() for b in buckets]
            for client in self.clients:
                box: dict = {}
                updates.append((_start(box, client.update_weights, manifest), box))
        largest = send_buckets(stream, buckets, self.rank, list(zip(self.links, self.workers)),
                               device=self.links[0].device if self.links else "cpu")

        def finish():
            for thread, box in updates:
                _join(thread, box)
            for client in self.clients:
                client.finish_weight_update(version)

        on_rank0(finish, share=False)
        return largest


def _start(box: dict, fn, *args) -> threading.Thread:
    def run():
        try:
            fn(*args)
        except BaseException as e:  # re-raised by _join on the calling thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _join(thread: threading.Thread | None, box: dict) -> None:
    if thread is not None:
        thread.join()
    if "error" in box:
        raise box["error"]

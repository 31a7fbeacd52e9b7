"""Run under torchrun: the distillation losses on logits split over 2 tensor-parallel ranks.

    torchrun --nproc-per-node 2 tests/rl/distill_tp_worker.py OUT_DIR

Every rank holds the columns [rank * V/2, (rank + 1) * V/2) of the same [N, V] logits (as
megatron's vocab-parallel output layer leaves them), computes full_kl and topk_kl with the TP
group, backpropagates each through its shard, and saves OUT_DIR/rank{r}.pt. The test compares
those with one process holding the whole vocabulary (`case()` is the data both use).
"""

import sys
import warnings
from pathlib import Path

import torch

N, V, K = 5, 16, 3


def case() -> dict[str, torch.Tensor]:
    """Student logits [N, V], the teacher's dense log-probs [N, V] and its top-K ids / log-probs
    [N, K] (global ids, in the teacher's ranking order). Same numbers in every process."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(N, V, generator=g)
    teacher = torch.log_softmax(1.5 * torch.randn(N, V, generator=g), -1)
    # Row 0: the teacher's top-K all in the first half (rank 0's shard), row 1 all in the second
    # half (rank 1's): a rank then holds none of a row's ids and still gets a gradient.
    teacher[0, :K] += 4
    teacher[1, V - K:] += 4
    teacher = torch.log_softmax(teacher, -1)
    top_lp, top_ids = teacher.topk(K, -1)
    return {"logits": logits, "teacher": teacher, "top_ids": top_ids, "top_lp": top_lp}


def run(out_dir: Path) -> None:
    from megatron.core import parallel_state

    from mimo_train.parallel.setup import init_distributed
    from mimo_train.rl import distill

    init_distributed(tp=2)
    group = parallel_state.get_tensor_model_parallel_group()
    rank, width = group.rank(), V // group.size()
    cols = slice(rank * width, (rank + 1) * width)
    c = case()

    shard = c["logits"][:, cols].clone().requires_grad_(True)
    full = distill.full_kl(shard, c["teacher"][:, cols], group)
    full.sum().backward()
    full_grad = shard.grad.clone()

    shard.grad = None
    topk, mass = distill.topk_kl(shard, c["top_ids"], c["top_lp"], group, vocab_start=rank * width)
    topk.sum().backward()
    topk_grad = shard.grad.clone()

    torch.save({"full": full.detach(), "full_grad": full_grad, "topk": topk.detach(), "mass": mass,
                "topk_grad": topk_grad}, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    run(Path(sys.argv[1]))
    torch.distributed.destroy_process_group()

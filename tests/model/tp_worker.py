"""Run under torchrun: build a dense tiny model with tensor parallelism and save its logits.

    torchrun --nproc-per-node 2 tests/model/tp_worker.py OUT.pt TP [MTP_FEED]
"""

import sys
import warnings

import torch

from mimo_train.model.config import ModelConfig
from mimo_train.model.gpt import build_model
from mimo_train.model.spec import MegatronOptions
from mimo_train.parallel.setup import device, init_distributed

DENSE_TINY = dict(moe_layer_freq=[0] * 6, num_key_value_heads=2, swa_num_key_value_heads=2)


def logits(tp: int, feed: str = "chained") -> list[torch.Tensor]:
    return run(tp, feed)[0]


def run(tp: int, feed: str = "chained") -> tuple[list[torch.Tensor], dict[str, tuple]]:
    """Logits of every depth, and (local shape, global shape) of each sink parameter as
    megatron's distributed checkpointing will store it."""
    init_distributed(tp=tp, seed=0)
    on = device()  # the rank's GPU under NCCL (the GPU lane), else the CPU
    model = build_model(ModelConfig.preset("tiny", **DENSE_TINY, mtp_feed=feed), MegatronOptions(tp=tp)).to(on)
    sinks = {k: (tuple(t.local_shape), tuple(t.global_shape))
             for k, t in model.sharded_state_dict().items() if k.endswith("sinks")}
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1)).to(on)
    with torch.no_grad():
        return [t.cpu() for t in model(ids, runtime_gather_output=True).logits], sinks


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    out, sinks = run(int(sys.argv[2]), *sys.argv[3:])
    if torch.distributed.get_rank() == 0:
        torch.save({"logits": out, "sinks": sinks}, sys.argv[1])
    torch.distributed.destroy_process_group()

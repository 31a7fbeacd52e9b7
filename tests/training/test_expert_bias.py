"""The aux-loss-free expert bias moves against the load: after one step each MoE router's
bias equals rate * sign(mean load - expert load), the load counted independently by our hooks."""

import torch
from megatron.core.transformer.moe.router import TopKRouter

from mimo_train.data.dataset import DataLoader, PackedDataset
from mimo_train.parallel.layout import check_layout
from mimo_train.parallel.setup import init_distributed
from mimo_train.training.config import load_config
from mimo_train.training.trainer import Trainer
from tests.training.runs import tiny_args


def test_bias_update_follows_the_load(synthetic_data, tmp_path, megatron_single):
    cfg = load_config(tiny_args(synthetic_data, tmp_path, "train.expert_bias_update_rate=0.01"))
    layout = check_layout(cfg.model, 1, 1, 1, 1, None, cfg.train.global_batch, cfg.train.micro_batch)
    init_distributed(seed=cfg.train.seed)
    trainer = Trainer(cfg, layout)
    loader = DataLoader(PackedDataset(cfg.data), cfg.train.global_batch, cfg.train.micro_batch)
    trainer.train_step(loader.next_global_batch())
    routers = [m for m in trainer.model[0].modules() if isinstance(m, TopKRouter)]
    assert len(routers) == 5
    for router in routers:
        load = trainer.router_stats.load[router.layer_number - 1]
        expected = 0.01 * torch.sign(load.mean() - load)
        assert torch.allclose(router.expert_bias.double(), expected, atol=1e-7), router.layer_number
    init_distributed()

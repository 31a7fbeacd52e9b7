"""The RL update of a transformers student under DeepSpeed ZeRO (trainer.backend=deepspeed):
the megatron RL trainer's objective and metrics (`RLObjective`) on the DeepSpeed trainer's
model, optimizer, schedule and checkpoints.

Per micro-batch the student's forward gives each response token's -log pi_theta at the
sampling temperature (and, for rl.distill_loss full / topk, the tempered logits); the policy
loss, the IS gate and the distillation KL are the megatron path's code. A transformers student
has no MTP layers and no routers: there is nothing to detach, draft or replay.
"""

from __future__ import annotations

import time

import torch

from mimo_train.rl.config import RLConfig
from mimo_train.rl.trainer import RLObjective
from mimo_train.training import hf_student
from mimo_train.training.deepspeed_trainer import DeepSpeedTrainer
from mimo_train.training.trainer import StepResult


class DeepSpeedRLTrainer(RLObjective, DeepSpeedTrainer):
    def __init__(self, config, layout, rl: RLConfig):
        self.rl = rl
        super().__init__(config, layout)
        self.domains = rl.distill_domains if rl.distill_loss != "sampled" else []
        self._disagree = torch.zeros(2, dtype=torch.float64, device=self.device)  # no routers: stays zero

    def train_rl_step(self, micro_batches: list[dict]) -> StepResult:
        t0 = time.time()
        counts = self.loss_tokens(micro_batches)
        n = len(micro_batches)

        def loss(mb: dict):
            out = hf_student.forward(self.engine, mb, temperature=self.rl.temperature, keep_logits=bool(self.domains))
            return self._rl_loss(counts, n, mb, out)

        metrics = self._reduce_rl_metrics(self.run_micro_batches(micro_batches, loss), counts)
        result = self.update(metrics, metrics["loss/policy"])
        metrics["train/seconds"] = time.time() - t0
        return result

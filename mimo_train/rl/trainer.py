"""The RL update on megatron-core: the pretrain Trainer's model, optimizer and schedules with
a policy-gradient loss on rollout micro-batches (see mimo_train.rl.batch).

Per micro-batch: the forward returns each response token's -log pi_theta (the main depth's
cross-entropy, taken at the sampling temperature) and the MTP depths' losses (trunk detached,
so they train only the MTP layers). The policy loss (rl.loss.policy_loss) is a sum of
per-token terms weighted 1 / (|y| * sequences in the global batch): any DP size or
micro-batch count gives the gradient of one process. With rl.distill_loss full or topk the
forward also keeps the main depth's (vocab-parallel) logits, and each response position adds
its IS-gated KL to the teacher (rl/distill.py) instead of the sampled-token advantage. Routing replay sets each MoE router's
top-k to what the engine chose for that token; without it the router's own choices are
recorded and their disagreement with the engine's is counted.
"""

from __future__ import annotations

import functools
import math
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplayAction

from mimo_train.model.experts import stacked_weights_reused
from mimo_train.model.gpt import MiMoOutput
from mimo_train.rl.config import RLConfig
from mimo_train.rl import distill
from mimo_train.rl.loss import distill_advantages, is_weights, policy_loss
from mimo_train.training.trainer import StepResult, Trainer, packed_params

LOSS_SUMS = ("tokens", "is_masked", "clipped", "ratio", "advantage", "advantage_sq", "kl")


def make_rl_trainer(config, layout, rl: RLConfig):
    """The RL trainer of `trainer.backend`: megatron (this module) or DeepSpeed."""
    if config.trainer.backend == "deepspeed":
        from mimo_train.rl.deepspeed_trainer import DeepSpeedRLTrainer

        return DeepSpeedRLTrainer(config, layout, rl)
    return RLTrainer(config, layout, rl)


class RLObjective:
    """The RL loss of one micro-batch and the step's metrics, shared by both backends' trainers.
    It reads the forward's `MiMoOutput` (per-depth cross-entropy at the sampling temperature,
    masks, top-1 hits, the kept main logits) and the trainer's `rl`, `domains`, `weights`,
    `config`, `layout`, `device` and `_disagree`."""

    def _distill_kl(self, mb, out: MiMoOutput, logp, mask):
        """rl.distill_loss full / topk: the loss sum_t token_weight * IS weight * KL_t (the
        report's IS gate and mask, on the exact per-position KL) and per-domain metric sums
        [tokens, KL, teacher's top-k mass, student's mass on it] for each domain."""
        logits = out.logits[0][0]  # [positions, vocab / tp]
        group = parallel_state.get_tensor_model_parallel_group()
        start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
        ids, lps = mb["teacher_top_ids"][0], mb["teacher_top_logprobs"][0]
        if self.rl.distill_loss == "full":
            # Prompt and padding positions carry no teacher scores (zeros): give them every id once.
            every = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
            ids = torch.where(mask[0].bool()[:, None], ids, every)
            teacher = distill.dense_teacher(ids, lps, self.config.model.vocab_size)
            kl = distill.full_kl(logits, teacher[:, start:start + logits.shape[-1]], group)
            student_mass = torch.ones_like(kl)
        else:
            kl, student_mass = distill.topk_kl(logits, ids, lps, group, start)
        gate, _ = is_weights(logp[0], mb["rollout_logprobs"][0], mask[0], self.rl.is_low, self.rl.is_high)
        m = mask[0].bool()
        loss = torch.where(m, mb["token_weight"][0].float() * gate * kl, 0.0).sum()
        domain = mb["domain"][0].clamp(min=0)
        sums = torch.zeros(len(self.domains), 4, dtype=torch.float64, device=kl.device)
        values = torch.stack([torch.ones_like(kl), kl.detach(), lps.float().exp().sum(-1), student_mass], -1)
        sums.index_add_(0, domain[m], values[m].double())
        return loss, sums.flatten()

    def _rl_loss(self, counts, num_microbatches, mb, out: MiMoOutput):
        rl = self.rl
        mask = mb["loss_mask"].float()
        logp = -out.losses[0].float()
        distill_adv = distill_advantages(mb["teacher_logprobs"], logp) if rl.algorithm == "mopd" \
            else torch.zeros_like(logp)
        if rl.algorithm == "grpo":
            advantages = mb["outcome"]
        elif rl.distill_loss == "sampled":
            advantages = distill_adv + rl.alpha * mb["outcome"]
        else:  # the teacher's signal is the KL term below; the policy gradient carries alpha x outcome
            advantages = rl.alpha * mb["outcome"]
        loss, sums = policy_loss(
            logp, mb["rollout_logprobs"], advantages * mask, mask, mb["token_weight"], kind=rl.algorithm,
            clip_low=rl.clip_low, clip_high=rl.clip_high, eps_low=rl.is_low, eps_high=rl.is_high,
            ref_logprobs=mb["ref_logprobs"] if rl.kl_coef > 0 else None, kl_coef=rl.kl_coef)
        domain_sums = []
        if self.domains:
            kl_loss, domain_sums = self._distill_kl(mb, out, logp, mask)
            loss = loss + kl_loss
        total = loss
        extra = [(distill_adv * mask).sum().double()]
        for depth in range(1, len(out.losses)):  # MTP: token mean over the global batch, trunk detached
            loss_sum = (out.losses[depth].float() * out.loss_masks[depth]).sum()
            total = total + self.weights[depth] * loss_sum / counts[depth].clamp(min=1).float()
            extra += [loss_sum.detach().double(), (out.correct[depth].float() * out.loss_masks[depth]).sum().double()]
        scale = num_microbatches * parallel_state.get_data_parallel_world_size()
        reported = torch.stack([loss.detach().double()] + [sums[k].double() for k in LOSS_SUMS] + extra)
        if self.domains:
            reported = torch.cat([reported, domain_sums])
        return total * scale, reported

    def _reduce_rl_metrics(self, results: list, counts: torch.Tensor) -> dict:
        depths = len(self.weights)
        size = 1 + len(LOSS_SUMS) + 1 + 2 * (depths - 1) + 4 * len(self.domains)
        sums = torch.zeros(size, dtype=torch.float64, device=self.device)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            for r in results:
                sums += r.double()
            dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        if self.layout.pp > 1:
            dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
        disagree = self._disagree.clone()
        dist.all_reduce(disagree)  # every rank's routers saw a distinct part of the tokens x layers
        named = dict(zip(("policy",) + LOSS_SUMS + ("distill",), sums.tolist()))
        tokens = max(named["tokens"], 1.0)
        mean_adv = named["advantage"] / tokens
        m = {"loss/policy": named["policy"], "rl/response_tokens": named["tokens"],
             "rl/is_masked_fraction": named["is_masked"] / tokens, "rl/clipped_fraction": named["clipped"] / tokens,
             "rl/ratio_mean": named["ratio"] / tokens, "rl/advantage_mean": mean_adv,
             "rl/advantage_std": math.sqrt(max(named["advantage_sq"] / tokens - mean_adv ** 2, 0.0)),
             "rl/kl_ref": named["kl"] / tokens}
        if self.rl.algorithm == "mopd":
            m["rl/teacher_minus_student_logprob"] = named["distill"] / tokens
        for d in range(1, depths):
            loss_sum, hits = sums[1 + len(LOSS_SUMS) + 1 + 2 * (d - 1):][:2].tolist()
            m[f"loss/mtp_{d}"] = loss_sum / max(float(counts[d]), 1.0)
            m[f"acc/mtp_{d}"] = hits / max(float(counts[d]), 1.0)
        per_domain = sums[size - 4 * len(self.domains):].view(-1, 4).tolist() if self.domains else []
        for name, (tokens_d, kl, teacher_mass, student_mass) in zip(self.domains, per_domain):
            if tokens_d:  # a domain absent from this step's batch reports nothing
                m[f"distill/kl/{name}"] = kl / tokens_d
                m[f"distill/teacher_topk_mass/{name}"] = teacher_mass / tokens_d
                m[f"distill/student_topk_mass/{name}"] = student_mass / tokens_d
        if not self.rl.routing_replay and disagree[0] > 0:
            m["moe/router_disagreement"] = float(disagree[1] / disagree[0])
        return m


class RLTrainer(RLObjective, Trainer):
    routing_replay = True  # build routers with megatron's replay hooks (replay or record)

    def __init__(self, config, layout, rl: RLConfig):
        self.rl = rl
        super().__init__(config, layout)
        self.routers: list[tuple[int, TopKRouter]] = []
        moe_layers = [i for i in range(config.model.num_hidden_layers) if config.model.is_moe(i)]
        # full / topk distillation: the KL to each domain's teacher, summed per domain for metrics.
        self.domains = rl.distill_domains if rl.distill_loss != "sampled" else []
        for chunk in self.model:
            bare = chunk.module
            bare.detach_mtp, bare.logit_temperature = True, rl.temperature
            bare.keep_main_logits = bool(self.domains)
            for module in bare.modules():
                if isinstance(module, TopKRouter):
                    self.routers.append((moe_layers.index(module.layer_number - 1), module))
                    module.register_forward_hook(self._compare_routing)
        self._disagree = torch.zeros(2, dtype=torch.float64, device=self.device)  # (token-experts compared, differing)

    def _replay(self, mb: dict) -> None:
        """Give every local router its tokens' engine-chosen experts (this TP rank's slice of
        the sequence under sequence parallel), to replay or to compare with."""
        routed, valid = mb.get("routed"), mb.get("routed_valid")
        for index, router in self.routers:
            if routed is None or router.router_replay is None:
                router._mimo_expected = None
                continue
            experts, mine = routed[0, :, index], valid[0]  # [tokens, k], [tokens]
            if self.tconfig.sequence_parallel and self.layout.tp > 1:
                rank = parallel_state.get_tensor_model_parallel_rank()
                experts, mine = experts.chunk(self.layout.tp)[rank], mine.chunk(self.layout.tp)[rank]
            router._mimo_expected, router._mimo_valid = experts, mine
            router.router_replay.clear_indices()
            if self.rl.routing_replay:
                router.router_replay.set_target_indices(experts)
                router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
            else:
                router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)

    def _compare_routing(self, router, inputs, output) -> None:
        expected = getattr(router, "_mimo_expected", None)
        if expected is None or self.rl.routing_replay or router.router_replay.recorded_topk_idx is None:
            return
        valid = router._mimo_valid.to(expected.device)  # padding tokens are not compared
        mine = router.router_replay.recorded_topk_idx[valid]
        theirs = expected[valid].to(mine.device)
        differ = (mine.unsqueeze(-1) != theirs.unsqueeze(-2)).all(-1).sum()  # chosen by one side only
        self._disagree += torch.stack([torch.tensor(float(mine.numel())), differ.double().cpu()]).to(self._disagree)

    def _rl_forward_step(self, counts, num_microbatches, data_iterator, model):
        mb = self.to_device(next(data_iterator))
        self._replay(mb)
        out = model(mb["tokens"], position_ids=mb["position_ids"], labels=mb["labels"],
                    loss_mask=mb["loss_mask"].float(), packed_seq_params=packed_params(mb))
        return out, functools.partial(self._rl_loss, counts, num_microbatches, mb)

    def train_rl_step(self, micro_batches: list[dict]) -> StepResult:
        t0 = time.time()
        counts = self.depth_token_counts(micro_batches)
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.router_stats.reset()
        self._disagree.zero_()
        n = len(micro_batches)
        with stacked_weights_reused(self.model):
            results = get_forward_backward_func()(
                forward_step_func=functools.partial(self._rl_forward_step, counts, n),
                data_iterator=[iter(micro_batches) for _ in self.model] if len(self.model) > 1 else iter(micro_batches),
                model=self.model if len(self.model) > 1 else self.model[0],
                num_microbatches=n, seq_length=micro_batches[0]["tokens"].shape[1], micro_batch_size=1,
                forward_only=False)
        for _, router in self.routers:
            if router.router_replay is not None:
                router.router_replay.clear_router_replay_action()
                router.router_replay.clear_indices()
        metrics = self._reduce_rl_metrics(results, counts)
        result = self.update(metrics, metrics["loss/policy"])
        metrics["train/seconds"] = time.time() - t0
        return result

"""One RL update moves the policy the way the advantages ask.

The loss tests check the objective's numbers; this checks the whole update path (packing,
label alignment, token weights, megatron's backward and optimizer step): after one step on
fixed samples, tokens with a positive advantage are more likely and tokens with a negative one
less likely, and the first-order gain sum_t w_t * A_t * (log pi_new - log pi_old) is positive.
A sign error fails it, and so do MOPD's per-token advantages shifted by one position against
their tokens (both checked by breaking the trainer on purpose).
"""

import random

import pytest
import torch

from mimo_train.parallel.layout import check_layout
from mimo_train.rl import batch as rl_batch
from mimo_train.rl.trainer import RLTrainer
from mimo_train.training.config import load_config
from mimo_train.training.trainer import packed_params

SAMPLES, GROUP = 8, 2


def _trainer(algorithm: str) -> RLTrainer:
    config = load_config([f"recipe={algorithm}", "model=tiny", "model.num_key_value_heads=2",
                          f"train.global_batch={SAMPLES}", "train.micro_batch=4", f"rl.prompts_per_step={SAMPLES // GROUP}",
                          f"rl.group_size={GROUP}", "optim.lr=1e-4", "optim.min_lr=1e-4", "train.steps=1",
                          "rl.routing_replay=false"])
    layout = check_layout(config.model, 1, 1, 1, 1, None, config.train.global_batch, config.train.micro_batch)
    return RLTrainer(config, layout, config.rl)


def _logprobs(trainer: RLTrainer, mbs: list[dict]) -> list[torch.Tensor]:
    """The main depth's log-prob of every label, at the trainer's temperature."""
    model, out = trainer.model[0], []
    with torch.no_grad():
        for mb in mbs:
            trainer._replay(mb)
            o = model(mb["tokens"], position_ids=mb["position_ids"], labels=mb["labels"],
                      loss_mask=mb["loss_mask"].float(), packed_seq_params=packed_params(mb))
            out.append(-o.losses[0].float())
    return out


def _samples(trainer: RLTrainer, algorithm: str) -> list[rl_batch.Sample]:
    rng = random.Random(0)
    vocab = trainer.config.model.vocab_size
    samples = [rl_batch.Sample([rng.randrange(4, vocab) for _ in range(5)], [rng.randrange(4, vocab) for _ in range(4)],
                               [0.0] * 4) for _ in range(SAMPLES)]
    # Rollout log-probs from the model itself: on-policy, every IS weight is 1.
    mbs = _micro_batches(samples)
    for s, lp in zip(samples, _per_sample(mbs, _logprobs(trainer, mbs))):
        s.rollout_logprobs = lp
        if algorithm == "mopd":  # a teacher that likes some of the student's tokens more, some less
            s.teacher_logprobs = [v + rng.choice((-1.0, 1.0)) for v in lp]
    for i, s in enumerate(samples):
        s.outcome_advantage = 1.0 if i % GROUP == 0 else -1.0  # each group: one winner, one loser
    return samples


def _micro_batches(samples):
    length = rl_batch.padded_length(samples, 4, 1)
    return rl_batch.micro_batches(samples, 4, num_sequences=len(samples), length=length)


def _per_sample(mbs, values) -> list[list[float]]:
    """Split each packed row's values at the response positions back into samples."""
    out = []
    for mb, v in zip(mbs, values):
        cu, mask = mb["cu_seqlens"].tolist(), mb["loss_mask"][0]
        for a, b in zip(cu[:-1], cu[1:]):
            keep = mask[a:b].bool()
            if keep.any():
                out.append(v[0, a:b][keep].tolist())
    return out


@pytest.mark.parametrize("algorithm", ["grpo", "mopd"])
def test_one_update_follows_the_advantages(megatron_single, algorithm):
    torch.manual_seed(0)
    trainer = _trainer(algorithm)
    samples = _samples(trainer, algorithm)
    mbs = _micro_batches(samples)
    before = _logprobs(trainer, mbs)
    trainer.train_rl_step(mbs)
    after = _logprobs(trainer, mbs)

    gain, up, down = 0.0, [], []
    for mb, b, a in zip(mbs, before, after):
        mask = mb["loss_mask"].bool()
        adv = mb["outcome"] if algorithm == "grpo" else mb["teacher_logprobs"] - b
        delta = a - b
        gain += (mb["token_weight"] * adv * delta)[mask].sum().item()
        up += delta[mask & (adv > 0)].tolist()
        down += delta[mask & (adv < 0)].tolist()
    assert gain > 0
    assert up and down
    assert sum(up) / len(up) > 0 > sum(down) / len(down)

"""Both MTP conventions (`ModelConfig.mtp_feed`) are trained by megatron and drafted by our engine
the same way: a model trained one way drafts better read its own way than the other.

The task makes the MTP layers depend on their hidden input: sequences follow one of 4 fixed
permutations of 16 symbols (x_{t+1} = perm_c(x_t)), chosen by a first token c, with a sliding
window of 1. The MTP layers (SWA) cannot see c, so what they know of it comes through the hidden
state they read: the previous layer's output (chained) or the main model's (target_hidden).
Measured (`pytest -s tests/rollout/test_mtp_feed.py`: 200 steps per feed, tiny preset, 1 thread,
about 20 s each): accept length at K = 3 of greedy decoding, read as trained / read the other
way: chained 3.76 / 2.36, target_hidden 3.83 / 2.79. The first MTP layer is hardly affected (the
two feeds give it the same hidden state, after and before the final norm); the later ones are.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from mimo_train.model.config import ModelConfig
from mimo_train.model.gpt import build_model
from mimo_train.model.hf_mapping import to_hf
from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from mimo_train.training.loss import lm_loss

SYMBOLS, KEYS, SEQ = 16, 4, 32
PERMS = torch.stack([torch.randperm(SYMBOLS, generator=torch.Generator().manual_seed(100 + c)) for c in range(KEYS)])


def keyed_sequences(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, SEQ]: key token 20 + c, then symbols (ids 3..18) following permutation c."""
    c = torch.randint(0, KEYS, (n,), generator=gen)
    x = torch.randint(0, SYMBOLS, (n,), generator=gen)
    seq = [20 + c, 3 + x]
    for _ in range(SEQ - 2):
        x = PERMS[c, x]
        seq.append(3 + x)
    return torch.stack(seq, 1)


def train(feed: str, steps: int, directory) -> dict:
    """Train the tiny preset under `feed` and save it as a serving directory; returns the last
    step's accuracies."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", mtp_feed=feed, sliding_window_size=1)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = keyed_sequences(16, gen)
        labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
        mask = torch.ones_like(ids, dtype=torch.float32)
        mask[:, 0] = 0  # the key is not predictable
        loss, metrics = lm_loss(model(ids, labels=labels, loss_mask=mask), mtp_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    directory.mkdir(parents=True)
    cfg.save(directory)
    save_file({k: v.detach().contiguous() for k, v in to_hf(model.state_dict(), cfg).items()},
              str(directory / "model.safetensors"))
    return {k: v for k, v in metrics.items() if k.startswith("acc/")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, megatron_single, one_thread):
    root = tmp_path_factory.mktemp("feeds")
    return {feed: (root / feed, train(feed, 200, root / feed)) for feed in ("chained", "target_hidden")}


def accept_length(directory, read: str | None) -> float:
    """Greedy decoding of 8 prompts at K = 3 by the engine loaded from `directory`; `read`
    overrides the config's feed (None: as config.json says)."""
    engine = Engine.from_pretrained(directory, EngineConfig(device="cpu", max_batch=8, max_len=128))
    if read is not None:
        engine = Engine(dataclasses.replace(engine.cfg, mtp_feed=read), engine.state_dict(), engine.config)
    prompts = keyed_sequences(8, torch.Generator().manual_seed(5))[:, :6].tolist()
    _, metrics = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True),
                                 depth=3)
    return metrics.mean_accept_length


@pytest.mark.parametrize("feed, other", [("chained", "target_hidden"), ("target_hidden", "chained")])
def test_a_model_drafts_best_the_way_it_was_trained(trained, feed, other):
    directory, acc = trained[feed]
    assert json.loads((directory / "config.json").read_text())["mtp_feed"] == feed
    assert min(acc.values()) > 0.9, acc  # every depth learned the task
    own, swapped = accept_length(directory, None), accept_length(directory, other)
    print(f"trained {feed}: accept length at K=3 read {feed} {own:.2f}, read {other} {swapped:.2f}")
    assert own > 3.4, own  # of at most 4
    assert own > swapped + 0.5, (own, swapped)

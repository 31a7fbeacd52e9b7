"""tools/step_split.py, on the three sides tools/bench_train.py compares (our megatron Trainer on
model=tiny without and with its MTP layers, transformers' MiMoV2FlashForCausalLM on the same
config): the split's parts make up the step and fit inside their phases; a known delay added to
a kind's forward and backward (attention), or between the kinds (a decoder layer's own entry
and exit), rises that kind's time, or "other", by the delay and nothing else (the control that
time is attributed, not merely summed); the hooks are gone afterwards; and the bench's JSON
carries the split of each side."""

import time

import pytest
import torch
from megatron.core.transformer.transformer_layer import TransformerLayer
from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import MiMoV2FlashAttention, MiMoV2FlashDecoderLayer

from mimo_train.model.attention import MiMoAttention
from tools import bench_train

CPU = torch.device("cpu")
ROWS = bench_train.batch_of(256, 2, 16)  # tiny's vocabulary; two micro-batches of one 16-token row
# The known delay, per call, added to a module's forward and to its backward: 50 ms of this
# thread's CPU time, spent spinning, and the splits of the attribution test read that clock
# (StepSplit's `clock`), so that what other processes take from a busy machine is not noise
# here; on the CPU the backward runs in this thread too.
DELAY = 0.05
MODEL_KINDS = {"attention", "moe_router", "moe_dispatch", "experts", "dense_mlp", "norm", "embedding", "output_loss"}
SIDES = ["ours", "ours_with_mtp", "transformers"]


@pytest.fixture(scope="module")
def sides(megatron_single, one_thread):
    made = {"ours": bench_train.ours("tiny", 0, ROWS, CPU, False),
            "ours_with_mtp": bench_train.ours("tiny", 3, ROWS, CPU, False),
            "transformers": bench_train.transformers_side("tiny", ROWS, CPU, False)}
    for side in made.values():  # warm: the first step of a process pays one-time costs
        side.step()
    return made


def split_of(side, steps=1, clock=None) -> dict:
    split = side.split()
    if clock is not None:
        split.clock = clock
    with split:
        return split.measure(side.step, steps)


def spin() -> None:
    end = time.thread_time() + DELAY
    while time.thread_time() < end:
        pass


@pytest.mark.parametrize("name", SIDES)
def test_the_parts_make_up_the_step_and_fit_inside_their_phases(sides, name):
    r = split_of(sides[name], steps=2)
    want = MODEL_KINDS | ({"mtp"} if name == "ours_with_mtp" else set())
    assert set(r["kinds"]) == want
    fwd = sum(k["fwd_s"] for k in r["kinds"].values())
    bwd = sum(k["bwd_s"] for k in r["kinds"].values())
    other = r["other"]
    # Every kind holds time of its own in both directions (the embedding's backward included:
    # its inputs are token ids, so its region closes at the end of the backward pass).
    for kind, t in r["kinds"].items():
        assert t["fwd_s"] > 0 and t["bwd_s"] > 0, (kind, t)
    # The kinds are disjoint slices of the forward and of the backward (5-decimal rounding aside).
    tol = 5e-5 * (len(r["kinds"]) + 2)
    assert other["fwd_s"] >= -tol and other["bwd_s"] >= -tol and other["outside_s"] >= -tol, other
    assert fwd + bwd + r["hooks_s"] <= r["forward_s"] + r["backward_s"] + tol
    # Kinds + other (+ the hooks' own bookkeeping) is the step.
    assert fwd + bwd + other["fwd_s"] + other["bwd_s"] + other["outside_s"] + r["hooks_s"] == pytest.approx(
        r["step_s"], abs=tol)
    phases = r["forward_s"] + r["backward_s"] + r["optimizer_s"] + r.get("grad_finalize_s", 0.0)
    assert phases == pytest.approx(r["phases_sum_s"], abs=tol)
    assert phases <= r["step_s"] + tol
    assert r["optimizer_s"] > 0 and r["forward_s"] > 0 and r["backward_s"] > 0
    if name != "transformers":
        assert r["grad_finalize_s"] > 0


class SlowBackward(torch.autograd.Function):
    """Identity whose backward spins DELAY (and counts its calls)."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        SlowBackward.calls += 1
        spin()
        return grad


# What is made slower: attention modules, whose delay is attention's time, or whole decoder
# layers, whose delay (before the layer's forward, and in the backward as its output's gradient
# leaves) falls between the kinds: "other". Both found by class, not by the tool's rules.
TARGETS = {"attention": ((MiMoAttention, MiMoV2FlashAttention), "attention"),
           "layer glue": ((TransformerLayer, MiMoV2FlashDecoderLayer), "other")}


def slowed(modules: list[torch.nn.Module], classes: tuple, mtp_modules: set[int]):
    """Make each module of `classes` spin DELAY in its forward and DELAY in its backward; returns
    the forward calls counted (inside the MTP block and elsewhere) and the undo."""
    counts = {"main": 0, "mtp": 0}
    patched = []
    for m in modules:
        if not isinstance(m, classes):
            continue
        where = "mtp" if id(m) in mtp_modules else "main"

        def forward(*args, _original=m.forward, _where=where, **kwargs):
            counts[_where] += 1
            spin()
            out = _original(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                return SlowBackward.apply(out)
            return (SlowBackward.apply(out[0]), *out[1:])
        m.forward = forward
        patched.append(m)

    def undo():
        for m in patched:
            del m.forward
    return counts, undo


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name", SIDES)
def test_a_delay_is_charged_to_the_kind_it_happens_in_and_no_other(sides, name, target):
    side = sides[name]
    classes, kind = TARGETS[target]
    roots = side.split().roots  # built, not entered: no hooks yet
    modules = [m for root in roots for m in root.modules()]
    mtp = {id(m) for root in roots for n, sub in root.named_modules() if n.endswith("mtp") for m in sub.modules()}
    before = split_of(side, clock=time.thread_time)
    counts, undo = slowed(modules, classes, mtp)
    SlowBackward.calls = 0
    try:
        after = split_of(side, clock=time.thread_time)
    finally:
        undo()
    layers = 6  # tiny: 6 decoder layers (and 3 MTP layers), each with one attention
    assert counts["main"] == layers * len(ROWS)
    assert counts["mtp"] == (3 * len(ROWS) if name == "ours_with_mtp" else 0)
    assert SlowBackward.calls == counts["main"] + counts["mtp"]
    # Inside the MTP block the delay is MTP's time (MTP is counted whole).
    added = {(kind, d): counts["main"] * DELAY for d in ("fwd_s", "bwd_s")}
    added.update({("mtp", d): counts["mtp"] * DELAY for d in ("fwd_s", "bwd_s")})
    total = sum(added.values())
    parts = {(k, d): (before["kinds"][k][d], after["kinds"][k][d]) for k in after["kinds"] for d in ("fwd_s", "bwd_s")}
    parts.update({("other", d): (before["other"][d], after["other"][d]) for d in ("fwd_s", "bwd_s")})
    for (k, d), (was, now) in parts.items():
        rise, expect = now - was, added.get((k, d), 0.0)
        if expect:
            assert 0.95 * expect <= rise <= 1.2 * expect, (k, d, rise, expect)
        else:
            assert abs(rise) < 0.1 * total, (k, d, rise, total)


@pytest.mark.parametrize("name", ["ours_with_mtp", "transformers"])
def test_the_hooks_and_wrappers_are_gone_after_the_split(sides, name):
    side = sides[name]
    split = side.split()
    modules = [m for root in split.roots for m in root.modules()]
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]
    wrapped = [(obj, attr) for obj, attr, *_ in split.methods] + [t for ts in split.phases.values() for t in ts]
    own = [vars(obj).get(attr) for obj, attr in wrapped]
    with split:
        assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules] != hooks
        split.measure(side.step, 1)
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules] == hooks
    assert [vars(obj).get(attr) for obj, attr in wrapped] == own
    # A step now goes unseen: no gradient hook of the split fires, nothing is charged.
    seen = {k: dict(v) for k, v in split._acc.items()}
    side.step()
    assert split._acc == seen


def test_the_bench_json_carries_each_sides_split(megatron_single, one_thread, capsys):
    args = ["--model", "tiny", "--seq", "16", "--batch", "2", "--steps", "1", "--split-steps", "1"]
    result = bench_train.main(args)
    assert set(result["split"]) == {"ours", "ours_with_mtp", "transformers"}
    for name, r in result["split"].items():
        assert r["steps"] == 1 and r["timed_step_s"] > 0 and "attention" in r["kinds"], name
    assert "mtp" in result["split"]["ours_with_mtp"]["kinds"] and "mtp" not in result["split"]["ours"]["kinds"]
    assert "split" not in bench_train.main([*args, "--no-split"])

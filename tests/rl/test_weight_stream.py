"""Weight streaming, the trainer's side: every rank's pieces, cut into bounded buckets, put back
together on the receiving side, are exactly the weights the gather path (export's path) gives,
for one process and for TP=2, EP=2 and PP=2 layouts sending to another process over gloo; and
the padded geometry vLLM's CPU attention needs computes the same function."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mimo_train.model.config import ModelConfig
from mimo_train.model.gpt import build_model
from mimo_train.rl.weight_gather import gather_serving_weights
from mimo_train.rl.weight_stream import ServingGeometry, local_pieces, plan_stream, serving_tensors
from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from tests.rollout.rollout_utils import random_prompts
from tests.training.runs import launch

ROOT = Path(__file__).resolve().parents[2]


def randomised_tiny(**overrides):
    cfg = ModelConfig.preset("tiny", **overrides)
    model = build_model(cfg)
    with torch.no_grad():  # every tensor distinct, the expert bias included
        for p in model.parameters():
            p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if "expert_bias" in name:
                b.normal_()
    return cfg, model


def test_buckets_rebuild_the_gathered_weights_and_respect_the_bound(megatron_single):
    cfg, model = randomised_tiny()
    pieces = local_pieces([model], cfg, dtype=torch.float32)
    bound = 4096  # smaller than most tensors: they are cut into rows
    plan = plan_stream(pieces, bound)
    assert max(b.nbytes for b in plan.main + plan.draft) <= bound
    assert any(len(b.pieces) > 1 for b in plan.main)  # small tensors share buckets
    names = [p.name for b in plan.main for p in b.pieces]
    assert len(names) > len(set(names))  # and big ones span several
    got = serving_tensors([model], cfg, bucket_bytes=bound)
    expected = gather_serving_weights([model], cfg)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert all(".mtp." in p.name for b in plan.draft for p in b.pieces)
    assert not any(".mtp." in p.name for b in plan.main for p in b.pieces)
    assert plan.nbytes == sum(t.numel() * 4 for t in expected.values())


def test_a_rank_holds_one_bucket_beyond_its_weights():
    """Packing every bucket of a 37 MB model (what send_buckets does besides sending) raises a
    fresh process's memory by one 4 MB bucket, measured (RSS, with an allocator that hands freed
    buffers back; holding the plan would take over 8 buckets)."""
    out = subprocess.run([sys.executable, str(ROOT / "tests/rl/stream_worker.py"), "memory", "0", "-"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["plan_bytes"] > 8 * m["bound"] and m["largest"] <= m["bound"]
    assert m["peak"] <= m["bound"] + (1 << 20), m


def test_padded_value_heads_compute_the_same_function(megatron_single):
    cfg, model = randomised_tiny()
    assert cfg.v_head_dim != cfg.head_dim
    geometry = ServingGeometry(pad_v_head=True)
    padded = serving_tensors([model], cfg, geometry=geometry, bucket_bytes=1 << 12)
    plain = gather_serving_weights([model], cfg)
    v = "model.layers.1.self_attn.v_proj.weight"
    assert padded[v].shape[0] > plain[v].shape[0] and padded[v].abs().sum() == plain[v].abs().sum()
    prompts = random_prompts(cfg, [7, 19], seed=3)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)
    engines = [Engine(c, w, EngineConfig(device="cpu", max_batch=2, max_len=64))
               for c, w in ((cfg, plain), (geometry.config(cfg), padded))]
    (a, _), (b, _) = (e.generate(prompts, greedy, depth=2) for e in engines)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    for x, y in zip(a, b):
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs)) < 1e-4


def test_every_layout_streams_to_another_process(tmp_path, megatron_single):
    """TP=2, EP=2 and PP=2 trainers (2 gloo ranks) send their pieces to a receiver process; what
    it rebuilds equals the gather path's weights of the same distributed model."""
    port = wire_port()
    receiver = subprocess.Popen([sys.executable, str(ROOT / "tests/rl/stream_worker.py"), "receive", str(port),
                                 str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        code, printed = launch(["send", str(port), str(tmp_path)], nproc=2, script=ROOT / "tests/rl/stream_worker.py")
        assert code == 0, printed[-3000:]
        out, _ = receiver.communicate(timeout=120)
        assert receiver.returncode == 0, out[-3000:]
    finally:
        receiver.kill()
    for layout in ("tp2", "ep2", "pp2"):
        received = torch.load(tmp_path / f"{layout}.received.pt")
        gathered = torch.load(tmp_path / f"{layout}.gathered.pt")
        assert sorted(received) == sorted(gathered), layout
        for name, tensor in gathered.items():
            assert torch.equal(received[name], tensor), f"{layout}: {name}"
        stats = json.loads((tmp_path / f"{layout}.stats.json").read_text())
        assert 0 < stats["largest"] <= stats["bound"], layout


def wire_port() -> int:
    from mimo_train.rollout.vllm.server import free_port

    return free_port()

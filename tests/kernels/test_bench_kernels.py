"""tools/bench_kernels.py prints JSON: without a GPU it says so plainly; with --smoke it runs
its GPU code path on tiny shapes (here under the Triton interpreter) and its correctness
checks hold."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.kernels.attention_utils import triton_device

TOOL = Path(__file__).parents[2] / "tools" / "bench_kernels.py"


def test_without_a_gpu_it_says_so():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(TOOL)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["gpu"] is False and report["results"] == []
    assert report["message"].startswith("No CUDA GPU present")
    attn = [c for c in report["cases"] if c["kind"] != "speculative_sampling"]
    kinds = {(c["kind"], c["layer"]) for c in attn}
    assert kinds == {(k, layer) for k in ("training_attention", "decode_attention") for layer in ("global", "swa")}
    training = [c for c in report["cases"] if c["kind"] == "training_attention"]
    assert all(c["heads"] == 64 and c["dk"] == 192 and c["dv"] == 128 and c["tokens"] == 8192 for c in training)
    sampling = [c for c in report["cases"] if c["kind"] == "speculative_sampling"]
    assert {(c["batch"], c["mode"]) for c in sampling} == {(b, m) for b in (1, 4, 16, 64)
                                                           for m in ("plain", "filtered", "greedy")}
    assert all(c["vocab"] == 152576 and c["drafts"] == 3 for c in sampling)


def test_smoke_run_checks_the_kernels():
    triton_device()
    spec = importlib.util.spec_from_file_location("bench_kernels", TOOL)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--smoke"])
    json.dumps(report)  # serialisable
    assert len(report["results"]) == 9  # 2 training, 4 decode, 3 sampling cases
    for result in report["results"]:
        assert max(result["check"].values()) <= 2e-2
        triton = result["triton"]
        assert all("ms" in t for t in ([triton["fwd"], triton["fwd_bwd"]] if "fwd" in triton else [triton]))

"""Parameter counts: the release preset has the published sizes; tiny stays tiny."""

import json
import subprocess
import sys
from pathlib import Path

from mimo_train.model.config import ModelConfig
from mimo_train.model.params import count_parameters

ROOT = Path(__file__).resolve().parents[2]


def test_release_counts_match_the_report():
    out = subprocess.run([sys.executable, "tools/param_count.py", "model=mimo_v2_flash"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(counts["total"] / 308.8e9 - 1) <= 0.005
    assert abs(counts["active_per_token"] / 15.4e9 - 1) <= 0.005
    assert 0.95e9 <= counts["mtp"] <= 1.05e9  # "about 1B" for 3 MTP layers


def test_tiny_and_small_sizes(megatron_single):
    tiny = count_parameters(ModelConfig.preset("tiny"))
    assert tiny["total"] + tiny["mtp"] < 1_000_000
    small = count_parameters(ModelConfig.preset("small"))
    assert 2_000_000 <= small["total"] <= 20_000_000

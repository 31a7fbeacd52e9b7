"""TP=2 x PP=2 training checkpoint -> export -> import (TP=1): the same weights, bit for bit; the
export loads with transformers and gives our logits; the import is what `checkpoint.load=`
accepts."""

import dataclasses
import json
import re

import torch

from mimo_train.convert.dist_reader import DistCheckpoint
from mimo_train.model.gpt import build_model
from mimo_train.model.spec import MegatronOptions
from mimo_train.training import checkpoint
from tests.convert.conftest import run_config, tool
from tests.model.hf_utils import load_transformers


def all_tensors(ck: DistCheckpoint) -> dict[str, torch.Tensor]:
    read = ck.read({(k, None): None for k in ck.tensors()})
    return {k: t for (k, _), t in read.items()}


def test_export_import_round_trip_is_bit_identical(trained, exported, tmp_path, megatron_single):
    out = tmp_path / "imported"
    tool("import_hf").main(["--hf", str(exported[0]), "--out", str(out)])

    original, imported = DistCheckpoint(trained), DistCheckpoint(out)
    assert original.state["layout"]["tp"] == 2 and original.state["layout"]["pp"] == 2
    assert imported.state["layout"]["tp"] == 1 and imported.state["layout"]["pp"] == 1
    a, b = all_tensors(original), all_tensors(imported)
    assert set(a) == set(b)
    assert any(k.startswith("mtp.layers.2.") for k in a) and any(".experts.experts." in k for k in a)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different

    # What a run with `checkpoint.load=<out>` does (training/loop.py resume): the state's model
    # config must equal the run's, then the weights load into the run's model.
    assert (out / "latest").read_text().strip() == "iter_0000000"
    state = checkpoint.read_state(out / "iter_0000000")
    assert state["model"] == dataclasses.asdict(run_config()) == original.state["model"]
    assert state["weights_only"] is True
    model = build_model(run_config(), MegatronOptions())
    checkpoint.load(out / "iter_0000000", [model], None, load_optimizer=False, load_rng=False)
    loaded = model.state_dict()
    assert torch.equal(loaded["decoder.layers.1.mlp.experts.local_experts.5.linear_fc1.weight"],
                       a["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"][5])


@torch.no_grad()
def test_transformers_logits_equal_ours(trained, exported, megatron_single):
    """Ours: the training model, loaded by the training code from the TP=2 x PP=2 checkpoint."""
    cfg = run_config()
    model = build_model(cfg, MegatronOptions()).eval()
    checkpoint.load(checkpoint.latest(trained), [model], None, load_optimizer=False, load_rng=False)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    ours = model(ids).logits[0]
    theirs = load_transformers(exported[0])(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"transformers vs training model, fp32: max |logit diff| = {diff:.3e}")
    assert diff <= 1e-4


def test_verify_prints_the_max_logit_difference(exported):
    printed = exported[1]
    m = re.search(r"verify \(transformers\): max \|logit difference\| = ([0-9.e+-]+)", printed)
    assert m, printed
    assert float(m.group(1)) <= 1e-4
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["verify"]["reference"] == "transformers"
    assert summary["shards"] > 1

"""tools/export.py on trainer=deepspeed checkpoints: a ZeRO-2 run (one process) and a ZeRO-3 run
(two ranks, every parameter sharded) exported to a directory transformers loads, whose weights
are exactly the weights DeepSpeed trained, with the run's tokenizer; and one error line for a
checkpoint it cannot export.

The reference is DeepSpeed's own view of the trained weights, reached without the exporter's
consolidation (which reads the fp32 master partitions of the optimizer shards):
- ZeRO-2: the engine's module state dict, which DeepSpeed saves whole in mp_rank_00_model_states.pt;
- ZeRO-3: the parameters of an engine that loads the checkpoint on two ranks, as a resume does,
  and gathers them (tests/convert/deepspeed_gather.py).
"""

import contextlib
import io
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.training.runs import ROOT, launch, tool, train

STEPS = 3


@pytest.fixture(scope="module")
def student(data_dir, tmp_path_factory):
    """A tiny transformers Llama on the test data's tokenizer: the run's starting point."""
    return tool("make_student").make(tmp_path_factory.mktemp("ds_student") / "llama", arch="llama",
                                     tokenizer=data_dir / "tokenizer")


def _train(data_dir, student, run_dir, stage: int, nproc: int) -> None:
    train(["recipe=pretrain", "trainer=deepspeed", f"trainer.model_dir={student}", f"trainer.zero_stage={stage}",
           f"train.steps={STEPS}", "train.global_batch=8", "train.micro_batch=2", "optim.warmup_steps=1",
           "data.seq_len=64", f"data.path={data_dir}/train.jsonl", f"data.tokenizer={data_dir}/tokenizer",
           f"logging.run_dir={run_dir}", "logging.progress=false", "logging.plot=false"], nproc=nproc)


def _gathered(iter_dir, student, out, nproc: int) -> dict[str, torch.Tensor]:
    code, printed = launch([str(iter_dir), str(student), str(out)], nproc=nproc,
                           script=ROOT / "tests" / "convert" / "deepspeed_gather.py")
    assert code == 0, printed[-3000:]
    return load_file(out)


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2-1rank", "zero3-2ranks"])
def trained(request, data_dir, student, tmp_path_factory):
    """(checkpoint dir, {name: fp32 weight as DeepSpeed holds it}, stage) of a 3-step run."""
    stage = request.param
    run_dir = tmp_path_factory.mktemp(f"ds_zero{stage}")
    nproc = 1 if stage == 2 else 2
    _train(data_dir, student, run_dir, stage, nproc)
    iter_dir = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    if stage == 2:
        saved = torch.load(iter_dir / "zero" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        reference = {k: v.float() for k, v in saved["module"].items()}
    else:
        reference = _gathered(iter_dir, student, run_dir / "gathered.safetensors", nproc)
    return run_dir / "checkpoints", reference, stage


def export(*args: str) -> dict:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        return tool("export").main([*args, "--no-progress"])


def export_error(*args: str) -> str:
    with pytest.raises(SystemExit) as e:
        export(*args)
    return str(e.value.code)


def load(directory, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, use_safetensors=True).eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    tokens = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    return model(input_ids=tokens, use_cache=False).logits.float()


def test_transformers_loads_exactly_the_weights_deepspeed_trained(trained, student, data_dir, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    checkpoints, reference, stage = trained
    out = tmp_path / "serving"
    summary = export("--ckpt", str(checkpoints), "--out", str(out), "--dtype", "fp32")  # tokenizer: the run's
    assert (summary["backend"], summary["zero_stage"], summary["step"]) == ("deepspeed", stage, STEPS)
    assert not (tmp_path / "serving.tmp").exists()

    model = load(out)
    weights = dict(model.named_parameters())
    assert sorted(weights) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.equal(weights[name].detach(), tensor), name  # fp32: bit for bit
    # Control: training moved the weights, so the export is not the starting student.
    assert (logits(model) - logits(load(student))).abs().max() > 1e-3

    text = "the export keeps the run's tokenizer"
    theirs = PreTrainedTokenizerFast.from_pretrained(str(data_dir / "tokenizer"))
    assert AutoTokenizer.from_pretrained(str(out)).encode(text) == theirs.encode(text)
    config, started = (json.loads((d / "config.json").read_text()) for d in (out, student))
    assert config == started  # the student's architecture and dtype (fp32), field for field


@pytest.fixture()
def orphaned(trained, tmp_path):
    """A copy of the checkpoint whose student directory (and tokenizer) no longer exist."""
    checkpoints, reference, _ = trained
    iter_dir = checkpoints / (checkpoints / "latest").read_text().strip()
    copy = shutil.copytree(iter_dir, tmp_path / "ckpt" / iter_dir.name)
    state_file = copy / "mimo_state.json"
    state = json.loads(state_file.read_text())
    state.update(student=str(tmp_path / "gone" / "student"), tokenizer=str(tmp_path / "gone" / "tokenizer"))
    state_file.write_text(json.dumps(state))
    return copy, reference


def test_a_gone_student_is_named_and_student_gives_the_config(orphaned, student, tmp_path):
    iter_dir, reference = orphaned
    out = tmp_path / "serving"
    message = export_error("--ckpt", str(iter_dir), "--out", str(out), "--no-tokenizer")
    assert message.startswith("export: error: ") and "\n" not in message
    assert f"{tmp_path}/gone/student" in message and "pass --student DIR" in message
    assert not out.exists() and not (tmp_path / "serving.tmp").exists()

    export("--ckpt", str(iter_dir), "--out", str(out), "--student", str(student), "--no-tokenizer")  # bf16
    weights = load_file(out / "model.safetensors")
    assert sorted(weights) == sorted(reference)
    for name, tensor in reference.items():
        assert weights[name].dtype == torch.bfloat16
        assert torch.equal(weights[name], tensor.to(torch.bfloat16)), name
    assert not [p.name for p in out.iterdir() if p.name.startswith("tokenizer")]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _drop_a_shard(iter_dir):
    min((iter_dir / "zero").glob("*_optim_states.pt")).unlink()


@pytest.mark.parametrize("args, change, expected", [
    ([], None, (r"the tokenizer directory the checkpoint names, .*gone/tokenizer, does not exist; "
                r"pass --tokenizer DIR .* or --no-tokenizer")),
    (["--fp8", "--no-tokenizer"], None, r"--fp8 is the MiMo serving format's .*: drop --fp8"),
    (["--no-tokenizer"], _drop_a_shard, (r"holds \d ZeRO optimizer shard\(s\) .* the run had \d "
                                        r"rank\(s\) .*: the checkpoint is incomplete")),
], ids=["tokenizer-gone", "fp8", "missing-shard"])
def test_bad_input_is_one_error_line_and_nothing_written(orphaned, student, tmp_path, args, change, expected):
    iter_dir, _ = orphaned
    if change:
        change(iter_dir)
    out = tmp_path / "serving"
    message = export_error("--ckpt", str(iter_dir), "--out", str(out), "--student", str(student), *args)
    assert message.startswith("export: error: ") and "\n" not in message, message
    assert re.search(expected, message), message
    assert not out.exists() and not (tmp_path / "serving.tmp").exists()



def test_a_student_config_the_weights_do_not_fit_is_refused_by_name(orphaned, student, tmp_path):
    """The weights load strictly: under a config with one layer fewer, the last layer's trained
    tensors have nowhere to go, and the error names them."""
    iter_dir, _ = orphaned
    config = json.loads((student / "config.json").read_text())
    config["num_hidden_layers"] -= 1
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "config.json").write_text(json.dumps(config))
    out = tmp_path / "serving"
    message = export_error("--ckpt", str(iter_dir), "--out", str(out), "--student", str(tmp_path / "short"),
                           "--no-tokenizer")
    assert message.startswith("export: error: ") and "\n" not in message, message
    last = config["num_hidden_layers"]
    assert re.search(rf"do not fit the student's config .*tensor\(s\) the config does not describe: "
                     rf"model\.layers\.{last}\.", message), message
    assert not out.exists() and not (tmp_path / "serving.tmp").exists()

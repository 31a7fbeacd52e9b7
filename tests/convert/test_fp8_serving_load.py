"""An FP8 serving directory (`tools/export.py --fp8`, the layout of the FP8 release) loads
wherever a serving directory is accepted -- `load_hf`, `Engine.from_pretrained`,
`tools/serve_teacher.py`, the teachers and `tools/evaluate.py` (`policy_io.read_policy`) --
dequantised on load, and computes what the dequantised weights compute.

Three twins of one tiny checkpoint (conftest `fp8_twins`): `fp32` and `fp8`, both written by our
exporter, and `deq`, made here from `fp8` by decoding every e4m3 weight with test_fp8's
bit-level reference (not with the code under test) and writing it as plain fp32.
- fp8 against deq: bit-for-bit equal results (the same fp32 weights run the same computation).
- fp8 against fp32: within the quantisation error. Each quantised matrix W is replaced by W + E
  with ||E||_F <= eps ||W||_F, eps the largest relative error measured over the matrices
  (<= 2^-4 by the block-FP8 bound of test_fp8). To first order each of the model's blocks
  moves its residual contribution by eps of its size and the blocks' errors add, so logits
  move by at most about n_blocks * eps * max|logits|; log-softmax moves each log-prob by at
  most twice the largest logit change. The difference must also be nonzero (FP8 is lossy).
- Controls: one corrupted block scale is caught by the exact comparison; damaged directories
  and other quantisations are refused by every loader with one message naming the problem
  and the fix.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mimo_train
from mimo_train.data.tasks import generate, write_jsonl
from mimo_train.data.tokenizer import build_tokenizer
from mimo_train.rl.policy_io import read_policy
from mimo_train.rl.teachers import InProcessTeacher, RemoteTeacher, TeacherSpec, score_tokens
from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from tests.convert.conftest import FP8_BLOCK
from tests.convert.test_fp8 import reference_dequantize
from tests.training.runs import tool

ENGINE = dict(max_batch=2, max_len=64, dtype=torch.float32, device="cpu")
QUANTISED = "model.layers.0.self_attn.q_proj.weight"  # a matrix the tests corrupt


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def stored(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def write_copy(src: Path, dst: Path, tensors: dict[str, torch.Tensor], edit_config=None) -> Path:
    """`dst`: src's config (edited) and tokenizer-free metadata with `tensors` as one shard."""
    dst.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    shutil.copy(src / "generation_config.json", dst)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def twins(fp8_twins, tmp_path_factory) -> dict[str, Path]:
    """fp32 and fp8 (our exporter) and deq: fp8 decoded by the reference, written as fp32."""
    tensors = stored(fp8_twins["fp8"])
    e4m3 = [n for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn]
    assert len(e4m3) > 50 and all(n + "_scale_inv" in tensors for n in e4m3)
    decoded = {n: reference_dequantize(t, tensors[n + "_scale_inv"], FP8_BLOCK) if n in e4m3 else t
               for n, t in tensors.items() if not n.endswith("_scale_inv")}
    deq = write_copy(fp8_twins["fp8"], tmp_path_factory.mktemp("deq") / "deq", decoded,
                     lambda c: c.pop("quantization_config"))
    return {**fp8_twins, "deq": deq}


@pytest.fixture(scope="module")
def quantisation(twins):
    """eps (the largest relative Frobenius error of a quantised matrix) and the number of
    blocks a token passes through (main layers + the MTP layer)."""
    a, b = stored(twins["fp32"]), stored(twins["deq"])
    quantised = [n for n, t in stored(twins["fp8"]).items() if t.dtype == torch.float8_e4m3fn]
    eps = max(((a[n] - b[n]).norm() / a[n].norm()).item() for n in quantised)
    assert 0 < eps <= 2.0**-4
    cfg = json.loads((twins["fp32"] / "config.json").read_text())
    return eps, cfg["num_hidden_layers"] + cfg["num_nextn_predict_layers"]


def prompts(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(directory: Path, ids: torch.Tensor) -> list[torch.Tensor]:
    handle = mimo_train.load_hf(directory, device="cpu", dtype=torch.float32)
    return [x.float() for x in handle.all_logits(ids)]


# ---- load_hf -------------------------------------------------------------------------------
def test_load_hf_reads_fp8_as_its_dequantised_twin(twins, quantisation, megatron_single):
    ids = prompts(3, 24, seed=1)
    fp8_logits, deq_logits, fp32_logits = (logits(twins[k], ids) for k in ("fp8", "deq", "fp32"))
    for depth, (a, b) in enumerate(zip(fp8_logits, deq_logits)):  # main model and the MTP layer
        assert torch.equal(a, b), f"depth {depth}"
    eps, blocks = quantisation
    diff = (fp8_logits[0] - fp32_logits[0]).abs().max().item()
    tol = blocks * eps * fp32_logits[0].abs().max().item()
    print(f"load_hf: FP8 vs fp32 twin max |logit diff| = {diff:.3e}, tolerance {tol:.3e} (eps {eps:.3e})")
    assert 0 < diff <= tol


# ---- the rollout engine ---------------------------------------------------------------------
def test_engine_reads_fp8_as_its_dequantised_twin(twins, quantisation):
    engines = {k: Engine.from_pretrained(twins[k], EngineConfig(**ENGINE)) for k in ("fp8", "deq", "fp32")}
    a, b = engines["fp8"].state_dict(), engines["deq"].state_dict()
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert not any(n.endswith("_scale_inv") for n in a)

    batch = prompts(2, 12, seed=2).tolist()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    runs = {k: e.generate(batch, greedy, depth=1)[0] for k, e in engines.items()}  # with MTP drafting
    for x, y in zip(runs["fp8"], runs["deq"]):
        assert x.tokens == y.tokens and x.logprobs == y.logprobs

    # Against fp32, the same tokens (the fp32 twin's greedy answers) scored by both engines.
    responses = [c.tokens for c in runs["fp32"]]
    ours, theirs = (score_tokens(engines[k], batch, responses) for k in ("fp8", "fp32"))
    diff = max((x.logprobs - y.logprobs).abs().max().item() for x, y in zip(ours, theirs))
    eps, blocks = quantisation
    scale = logits(twins["fp32"], torch.tensor([p + r for p, r in zip(batch, responses)]))[0].abs().max().item()
    tol = 2 * blocks * eps * scale
    print(f"engine: FP8 vs fp32 twin max |logprob diff| = {diff:.3e}, tolerance {tol:.3e}")
    assert 0 < diff <= tol


# ---- teachers: tools/serve_teacher.py and in-process ----------------------------------------
def test_serve_teacher_scores_fp8_as_its_dequantised_twin(twins, quantisation):
    args = ["--ckpt", str(twins["fp8"]), "--port", "0", "--name", "fp8", "--max-batch", "2", "--max-len", "64",
            "--device", "cpu"]
    server = tool("serve_teacher").make_server(args)  # loads the teacher and binds; served here on a thread
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = RemoteTeacher(TeacherSpec("fp8", "math", str(twins["fp8"]), server=server.url), timeout_s=10)
        config = EngineConfig(max_batch=2, max_len=64, device="cpu")
        deq, fp32 = (InProcessTeacher(TeacherSpec(k, "math", str(twins[k])), config) for k in ("deq", "fp32"))
        batch, responses = prompts(2, 9, seed=3).tolist(), prompts(2, 7, seed=4).tolist()
        got = remote.logprobs(batch, responses)
        assert all(torch.equal(x, y) for x, y in zip(got, deq.logprobs(batch, responses)))
        diff = max((x - y).abs().max().item() for x, y in zip(got, fp32.logprobs(batch, responses)))
    finally:
        server.shutdown()
        server.server_close()
    eps, blocks = quantisation
    scale = logits(twins["fp32"], torch.tensor([p + r for p, r in zip(batch, responses)]))[0].abs().max().item()
    assert 0 < diff <= 2 * blocks * eps * scale


# ---- evaluation: tools/evaluate.py -----------------------------------------------------------
def test_evaluate_reads_fp8(twins, tmp_path):
    fp8_policy, deq_policy = read_policy(twins["fp8"]), read_policy(twins["deq"])  # what evaluate loads
    assert fp8_policy.config == deq_policy.config
    assert set(fp8_policy.weights) == set(deq_policy.weights)
    assert all(torch.equal(fp8_policy.weights[n], deq_policy.weights[n]) for n in fp8_policy.weights)

    build_tokenizer(tmp_path / "tokenizer")
    write_jsonl(generate("arithmetic", 2, seed=0) + generate("sort", 2, seed=0), tmp_path / "eval.jsonl")
    with contextlib.redirect_stdout(io.StringIO()):
        out = tool("evaluate").main(["--model", f"fp8={twins['fp8']}", "--model", f"deq={twins['deq']}",
                                     "--data", str(tmp_path / "eval.jsonl"), "--tokenizer", str(tmp_path / "tokenizer"),
                                     "--max-new-tokens", "4", "--batch-size", "4", "--device", "cpu",
                                     "--out", str(tmp_path / "eval"), "--no-progress"])
    assert out["results"]["fp8"] == out["results"]["deq"]


# ---- controls --------------------------------------------------------------------------------
def test_a_corrupted_scale_is_caught(twins, tmp_path, megatron_single):
    """The exact comparisons above would fail if the loader misread one scale: doubling one block's
    scale doubles exactly that block of the loaded weight and changes the logits."""
    tensors = stored(twins["fp8"])
    tensors[QUANTISED + "_scale_inv"][1, 0] *= 2
    bad = write_copy(twins["fp8"], tmp_path / "bad", tensors)
    a = Engine.from_pretrained(bad, EngineConfig(**ENGINE)).state_dict()[QUANTISED]
    b = Engine.from_pretrained(twins["deq"], EngineConfig(**ENGINE)).state_dict()[QUANTISED]
    rows, cols = slice(FP8_BLOCK[0], 2 * FP8_BLOCK[0]), slice(0, FP8_BLOCK[1])
    assert torch.equal(a[rows, cols], 2 * b[rows, cols]) and b[rows, cols].abs().max() > 0
    a[rows, cols] = b[rows, cols]
    assert torch.equal(a, b)
    ids = prompts(2, 16, seed=5)
    assert not torch.equal(logits(bad, ids)[0], logits(twins["deq"], ids)[0])


def _drop_scale(t, c):
    t.pop(QUANTISED + "_scale_inv")


def _transpose_scale(t, c):
    t[QUANTISED + "_scale_inv"] = t[QUANTISED + "_scale_inv"].t().contiguous()


def _no_quant_config(t, c):
    c.pop("quantization_config")


def _awq(t, c):
    c["quantization_config"] = {"quant_method": "awq", "bits": 4}


def _per_tensor(t, c):
    c["quantization_config"].pop("weight_block_size")


def _e5m2(t, c):
    t[QUANTISED] = t[QUANTISED].float().to(torch.float8_e5m2)


def _orphan_scale(t, c):
    t[QUANTISED] = t[QUANTISED].float()


DAMAGED = {  # how the directory is damaged -> what the one error line must say
    "missing scale": (_drop_scale, f"{QUANTISED}_scale_inv missing"),
    "scale of the wrong shape": (_transpose_scale, f"{QUANTISED}: weight .* needs scale_inv of shape"),
    "no quantization_config": (_no_quant_config, "no quantization_config"),
    "another quantisation": (_awq, "quant_method is 'awq'"),
    "per-tensor FP8": (_per_tensor, "per-tensor FP8 is not supported"),
    "float8 e5m2": (_e5m2, rf"format other than e4m3: {QUANTISED} \(torch.float8_e5m2\)"),
    "scale without a float8 weight": (_orphan_scale, f"scale.* without a float8 weight: {QUANTISED}_scale_inv"),
}
FIX = "export it again from its training checkpoint (python tools/export.py"


def _load_hf(d):
    mimo_train.load_hf(d, device="cpu")


def _engine(d):
    Engine.from_pretrained(d, EngineConfig(**ENGINE))


def _serve_teacher(d):
    try:
        tool("serve_teacher").make_server(["--ckpt", str(d), "--device", "cpu"])
    except SystemExit as e:
        raise ValueError(str(e)) from e


def _evaluate(d):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        tool("evaluate").main(["--model", str(d), "--data", str(d / "eval.jsonl")])
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    raise ValueError(lines[0])


LOADERS = {"load_hf": _load_hf, "engine": _engine, "serve_teacher": _serve_teacher, "evaluate": _evaluate}


@pytest.mark.parametrize("damage", DAMAGED)
def test_damaged_fp8_directories_are_refused_by_every_loader(damage, twins, tmp_path, megatron_single):
    edit, message = DAMAGED[damage]
    tensors, config = stored(twins["fp8"]), json.loads((twins["fp8"] / "config.json").read_text())
    edit(tensors, config)
    bad = write_copy(twins["fp8"], tmp_path / "bad", tensors, lambda c: (c.clear(), c.update(config)))
    write_jsonl(generate("sort", 1, seed=0), bad / "eval.jsonl")
    for name, load in LOADERS.items():
        with pytest.raises(ValueError) as err:
            load(bad)
        text = str(err.value)
        assert str(bad) in text and FIX in text, (name, text)
        assert re.search(message, text), (name, text)


def test_other_quantised_weights_are_named_as_such(twins, tmp_path, megatron_single):
    """A GPTQ-style checkpoint (packed int weights, no float8) is not 'unknown weights' alone:
    the error says they are quantisation tensors and what to do."""
    tensors = stored(twins["fp32"])
    w = tensors.pop(QUANTISED)
    prefix = QUANTISED.removesuffix(".weight")
    tensors[prefix + ".qweight"] = torch.zeros(w.shape[0], w.shape[1] // 8, dtype=torch.int32)
    tensors[prefix + ".scales"] = torch.ones(1, w.shape[0])
    bad = write_copy(twins["fp32"], tmp_path / "gptq", tensors)
    for load in (_load_hf, _engine):
        with pytest.raises(ValueError, match="quantisation tensors: the loaders dequantise only block FP8"):
            load(bad)

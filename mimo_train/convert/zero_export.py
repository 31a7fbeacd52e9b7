"""DeepSpeed (ZeRO-2/3) training checkpoint -> transformers serving directory, in one process.

A `trainer.backend=deepspeed` checkpoint (training/deepspeed_trainer.py) is our `iter_N/` with
`mimo_state.json` ("backend": "deepspeed", the student's serving dir, the tokenizer dir) and
DeepSpeed's own files under `iter_N/zero/`: per-rank model-state files and per-rank ZeRO
optimizer shards, which hold the fp32 master weights. The export:

1. checks everything it can before any work: the ZeRO files against the state's world size,
   the student's config.json (the state's `student`, or `student=` when that dir is gone), the
   tokenizer directory, the output path;
2. consolidates the shards on CPU with DeepSpeed's own consolidator
   (`deepspeed.utils.zero_to_fp32`), every file read with `torch.load(weights_only=True)`: the
   files hold tensors, plain containers and three small DeepSpeed records (allowlisted below),
   so nothing in them can run code;
3. builds the model from the student's config (`AutoModelForCausalLM.from_config`, never remote
   code) and copies the weights in strictly: a missing, unexpected or mis-shaped tensor is an
   error, listed by name; one consolidated tensor is materialised at a time;
4. writes `save_pretrained` (safetensors) in the asked dtype, the student's
   generation_config.json and the tokenizer files into `<out>.tmp`, which becomes `<out>` only
   when complete (and verified, with `verify=True`).

The result is what `AutoModelForCausalLM.from_pretrained(out)` loads, and what
`trainer.model_dir` takes to start another DeepSpeed run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from mimo_train.convert import atomic, serving
from mimo_train.convert.exporter import check_verification
from mimo_train.convert.names import DTYPES, ConvertError, shortlist
from mimo_train.training import checkpoint as training_checkpoint
from mimo_train.training import hf_student

TAG = "zero"  # the tag the trainer saves DeepSpeed's files under (deepspeed_trainer.TAG)


def read_checkpoint(ckpt: str | Path) -> tuple[Path, dict]:
    """A checkpoint dir (with `latest`) or one iter dir -> (iter dir, its state file)."""
    from mimo_train.convert.dist_reader import resolve

    path = resolve(ckpt)
    try:
        return path, training_checkpoint.read_state(path)
    except (training_checkpoint.CheckpointError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: unreadable {training_checkpoint.STATE_FILE}: {e}") from e


def is_deepspeed(state: dict) -> bool:
    return state.get("backend") == "deepspeed"


def default_tokenizer(path: Path, state: dict) -> Path:
    """The tokenizer the run trained with (its data.tokenizer, recorded in the state file): the
    export's tokenizer when neither --tokenizer nor --no-tokenizer is given."""
    recorded = state.get("tokenizer")
    if not recorded:
        raise ConvertError(f"{path}/{training_checkpoint.STATE_FILE} names no tokenizer; "
                           "pass --tokenizer DIR (the run's data.tokenizer) or --no-tokenizer")
    if not Path(recorded).is_dir():
        raise ConvertError(f"the tokenizer directory the checkpoint names, {recorded}, does not exist; "
                           "pass --tokenizer DIR (the run's data.tokenizer) or --no-tokenizer")
    return Path(recorded)


def student_dir(path: Path, state: dict, student: str | Path | None) -> Path:
    """Where the student's config.json is: `student` if given, else the dir the run started
    from. Checked as training checks a student: no remote code, a model type transformers has."""
    if student is None:
        recorded = state.get("student")
        if not recorded or not (Path(recorded) / "config.json").is_file():
            raise ConvertError(f"the student directory this DeepSpeed checkpoint started from, {recorded}, "
                               "is gone (no config.json there); pass --student DIR, a directory with that "
                               "student's config.json")
        where, d = "the checkpoint's student", Path(recorded)
    else:
        where, d = "--student", Path(student)
        if not (d / "config.json").is_file():
            raise ConvertError(f"--student {d}: no config.json there; give the directory of the student's "
                               "config.json (the serving directory the run started from)")
    try:
        cfg = json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{where} {d}/config.json is not valid JSON: {e}") from e
    try:
        hf_student.check_config(cfg, f"{where} {d}")  # as training checks it
    except hf_student.StudentError as e:
        raise ConvertError(str(e)) from None
    return d


def zero_files(path: Path, state: dict) -> Path:
    """`iter_N/zero/`, checked: one model-state file and one optimizer shard per rank."""
    zero = path / TAG
    ranks = state.get("world_size")
    if not zero.is_dir():
        raise ConvertError(f"{path} has no {TAG}/ directory: it is not a complete DeepSpeed checkpoint "
                           f"(its state file says backend=deepspeed); export another iter_* dir")
    optim = sorted(zero.glob("*_optim_states.pt"))
    models = sorted(zero.glob("*_model_states.pt"))
    if not models or len(optim) != ranks:
        raise ConvertError(f"{zero} holds {len(optim)} ZeRO optimizer shard(s) and {len(models)} model-state "
                           f"file(s); the run had {ranks} rank(s) and saved one shard per rank: the checkpoint is "
                           "incomplete (files were removed?); export another iter_* dir")
    return zero


# What DeepSpeed pickles besides tensors and plain containers: the loss scaler's settings, the
# ZeRO stage enum and the parameter -> flat-buffer offsets. Data records, no code.
def _deepspeed_records() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _weights_only_loads():
    """DeepSpeed's consolidator calls `torch.load(weights_only=False)`; torch's own switch
    TORCH_FORCE_WEIGHTS_ONLY_LOAD makes every load inside weights-only regardless."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_records()):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


@contextlib.contextmanager
def _quiet(progress: bool):
    """DeepSpeed prints its progress to stdout, which carries the tool's JSON summary: it goes
    to stderr (or nowhere, without progress)."""
    if progress:
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


def _one_line(e: BaseException) -> str:
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
    if found:
        return f"it pickles a Python object that is not plain data ({found.group(0)[len('Unsupported '):]})"
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def consolidate(path: Path, *, progress: bool = True) -> dict:
    """{parameter name: lazy fp32 tensor} (`.contiguous()` materialises one), from the ZeRO
    shards of every rank, by DeepSpeed's consolidator."""
    with _quiet(progress):
        # Imported here: importing deepspeed logs to stdout.
        from deepspeed.utils import zero_to_fp32

        try:
            with _weights_only_loads():
                return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(path), tag=TAG, lazy_mode=True)
        except Exception as e:  # DeepSpeed's ValueError / FileNotFoundError / UnpicklingError
            raise ConvertError(f"{path / TAG}: DeepSpeed could not consolidate the ZeRO shards: {_one_line(e)}") from e


def build_model(student: Path, weights: dict):
    """The student's architecture from its config.json, holding `weights` in fp32 (strict)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(str(student), trust_remote_code=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    target = model.state_dict()
    missing = sorted(set(target) - set(weights))
    unexpected = sorted(set(weights) - set(target))
    mismatched = [f"{k}: checkpoint {tuple(weights[k].shape)}, config {tuple(target[k].shape)}"
                  for k in sorted(set(target) & set(weights)) if tuple(weights[k].shape) != tuple(target[k].shape)]
    problems = [text for found, text in [
        (missing, f"{len(missing)} missing tensor(s): {shortlist(missing)}"),
        (unexpected, f"{len(unexpected)} tensor(s) the config does not describe: {shortlist(unexpected)}"),
        (mismatched, f"{len(mismatched)} shape mismatch(es): {shortlist(mismatched, 6)}")] if found]
    if problems:
        raise ConvertError(f"the checkpoint's weights do not fit the student's config ({student}/config.json): "
                           + "; ".join(problems) + "; pass --student DIR with the config the run trained")
    with torch.no_grad():
        for name, tensor in target.items():  # tied weights share a tensor: copied twice, same values
            tensor.copy_(weights[name].contiguous())
    if (student / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(student))
    model.eval()
    return model


def _prompts(model, n: int = 2, length: int = 16) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, use_cache=False).logits.float()


def export_deepspeed(ckpt: str | Path, out: str | Path, *, dtype: str = "bf16", shard_size: str | int = "5GB",
                     tokenizer: str | Path | None = None, student: str | Path | None = None, verify: bool = False,
                     verify_tol: float | None = None, overwrite: bool = False, progress: bool = True,
                     log=print) -> dict:
    """Write the serving directory of a DeepSpeed checkpoint; returns a summary. `tokenizer`:
    the directory whose tokenizer files to copy (None: none; `default_tokenizer` gives the run's)."""
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    limit = serving.parse_size(shard_size)
    path, state = read_checkpoint(ckpt)
    if not is_deepspeed(state):
        raise ConvertError(f"{path} was saved by the megatron backend, not DeepSpeed: export it with "
                           "mimo_train.convert.export_checkpoint")
    zero_files(path, state)
    source = student_dir(path, state, student)
    tokenizer_files = serving.tokenizer_files(tokenizer) if tokenizer is not None else []
    out = atomic.check_output(out, overwrite)

    start = time.time()
    weights = consolidate(path, progress=progress)
    model = build_model(source, weights)
    del weights
    tokens = _prompts(model) if verify else None
    reference = _logits(model, tokens) if verify else None  # the fp32 weights, before any rounding
    model.to(DTYPES[dtype])
    with atomic.output(out) as tmp:  # complete or absent: never a partial export
        model.save_pretrained(tmp, max_shard_size=limit)
        for file in tokenizer_files:
            shutil.copy2(file, tmp / file.name)
        tensors = {t.data_ptr(): t for t in model.state_dict().values()}  # a tied weight once
        summary = {"checkpoint": str(path), "out": str(out), "backend": "deepspeed",
                   "zero_stage": state.get("zero_stage"), "world_size": state.get("world_size"),
                   "step": state.get("step"), "student": str(source),
                   "tensors": len(tensors), "shards": len(list(tmp.glob("*.safetensors"))),
                   "bytes": sum(t.numel() * t.element_size() for t in tensors.values()), "dtype": dtype,
                   "tokenizer_files": [f.name for f in tokenizer_files]}
        if verify:
            with _quiet(progress):
                result = verify_export(tmp, tokens, reference)
            summary["verify"] = check_verification(result, verify_tol, out, log)
    summary["seconds"] = round(time.time() - start, 2)
    return summary


def verify_export(directory: Path, tokens: torch.Tensor, reference: torch.Tensor) -> dict:
    """The written directory loaded by transformers (safetensors, fp32 compute) against the
    model holding the consolidated fp32 weights."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, use_safetensors=True,
                                                    trust_remote_code=False).eval()
    diff = (_logits(reloaded, tokens) - reference).abs().max().item()
    return {"reference": "consolidated fp32 weights", "max_abs_diff": diff, "prompts": tokens.shape[0],
            "seq_len": tokens.shape[1]}

"""vLLM rollout for a DeepSpeed student (trainer.backend=deepspeed): the server starts from the
student's own directory, a server for another student is refused by name, and weights streamed
from a ZeRO-3 engine on two ranks, in buckets no larger than the bound, make the server compute
what transformers computes with the engine's weights. Without a server: the weight source's
names and data are those save_pretrained writes (tied lm_head left out), from a bare model and
from a ZeRO-2 engine, and a model whose parameters are not named as its files is refused."""

import json
import shutil

import pytest
import torch

from mimo_train.rl.weight_stream import received
from mimo_train.rl.zero_weights import StudentWeightsError, ZeroWeights, gather_groups
from tests.rollout.vllm_utils import SERVER_THREADS_ARG
from tests.training.runs import launch, tool

WORKER = "tests/rl/zero_stream_worker.py"
BUCKET_MB = 0.02  # 20971 bytes: below the embedding's and the MLP matrices' sizes, so they travel in row slices


def make_student(data, out, **sizes):
    """A tiny transformers Llama on the RL data's tokenizer; head dim 32 (vLLM's CPU attention
    takes 32, 64, 80, ... only)."""
    shape = {"hidden": 64, "heads": 2, "kv_heads": 1, "intermediate": 128, "layers": 2} | sizes
    return tool("make_student").make(out, arch="llama", tokenizer=data / "tokenizer", **shape)


@pytest.fixture(scope="module")
def student(rl_data, tmp_path_factory):
    return make_student(rl_data, tmp_path_factory.mktemp("student") / "llama")


def ds_config(rl_data, student, run_dir, *extra):
    from mimo_train.training.config import load_config

    return load_config(["recipe=grpo", "trainer=deepspeed", f"trainer.model_dir={student}", "rollout=vllm",
                        "train.steps=2", "train.global_batch=8", "train.micro_batch=4", "rl.prompts_per_step=4",
                        "rl.group_size=2", "optim.warmup_steps=0", f"rl.prompts={rl_data}/train.jsonl",
                        f"data.tokenizer={rl_data}/tokenizer", f"logging.run_dir={run_dir}", "logging.progress=false",
                        "logging.plot=false", "rollout.vllm.kv_cache_gb=0.25", SERVER_THREADS_ARG, *extra])


def hf_model(student, weights=None):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32, use_safetensors=True)
    if weights is not None:
        missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.eval()


def token_logprobs(model, seq):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].float()
    return torch.log_softmax(logits, -1)[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]


# ---- the weight source, without a server ------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_zero_source_sends_what_save_pretrained_writes_in_bounded_buckets(rl_data, tmp_path, tie):
    """A whole model (ZeRO-2's case: every rank holds it): the buckets, unpacked and assembled
    as a server's worker does, are the safetensors save_pretrained wrote, name for name."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    d = make_student(rl_data, tmp_path / "s", tie=tie)
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    bound = int(BUCKET_MB * (1 << 20))
    stream = ZeroWeights(torch.float32, model_dir=d).open([model], bound)
    assert max(b.nbytes for b in stream.plan.main) <= bound and not stream.plan.draft
    assert {b.src for b in stream.plan.main} == {0}  # rank 0 sends (zero_weights' docstring says why)
    assert any(len(g) > 1 for g in gather_groups(stream.plan.main))  # a tensor over several buckets: one gather
    got, files = received(stream), load_file(str(d / "model.safetensors"))
    assert sorted(got) == sorted(files)
    assert ("lm_head.weight" in got) == (not tie)
    for name, tensor in files.items():
        assert torch.equal(got[name], tensor), name
    assert received(stream, rank=1) == {}  # the other ranks send nothing


def test_a_zero2_engine_streams_its_models_weights(rl_data, student, tmp_path, megatron_single):
    """Through the engine the trainer hands the sync ([DeepSpeedEngine]): ZeRO-2 leaves every
    parameter whole on every rank, so nothing is gathered and the files' tensors come out."""
    from safetensors.torch import load_file

    from mimo_train.training.deepspeed_trainer import DeepSpeedTrainer

    trainer = DeepSpeedTrainer(ds_config(rl_data, student, tmp_path, "trainer.zero_stage=2"), layout=None)
    assert not any(hasattr(p, "ds_id") for p in trainer.engine.module.parameters())
    got = received(ZeroWeights(torch.float32, model_dir=student).open(trainer.model, int(BUCKET_MB * (1 << 20))))
    files = load_file(str(student / "model.safetensors"))
    assert sorted(got) == sorted(files) and all(torch.equal(got[n], t) for n, t in files.items())


def test_zero_source_refuses_parameters_missing_from_the_checkpoint(rl_data, tmp_path):
    """A model whose parameters are named unlike its files (transformers renames some at load)
    would fail inside the server: it is refused at the first update, naming the tensors."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    d = make_student(rl_data, tmp_path / "s")
    renamed = tmp_path / "renamed"
    shutil.copytree(d, renamed)
    files = load_file(str(d / "model.safetensors"))
    files["model.norm.scale"] = files.pop("model.norm.weight")
    save_file(files, str(renamed / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    with pytest.raises(StudentWeightsError, match=r"model\.norm\.weight.*checkpoint names"):
        ZeroWeights(torch.float32, model_dir=renamed).open([model], 1 << 20)


# ---- a real vLLM server ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(rl_data, student, tmp_path_factory):
    """A vLLM server as a DeepSpeed run starts it: from the student's directory (dummy weights
    until a push). Module-scoped: the world-size-2 run below is given its URL."""
    from mimo_train.rl.vllm_rollout import VLLMRollout
    from tests.rollout.vllm_utils import need_vllm

    need_vllm()
    run_dir = tmp_path_factory.mktemp("ds_vllm")
    rollout = VLLMRollout(ds_config(rl_data, student, run_dir), max_len=64)
    yield rollout
    rollout.close()


@pytest.mark.vllm
def test_the_server_serves_the_students_directory(served, student):
    assert served.clients[0].model_root() == str(student.resolve())
    command = served.servers[0].describe()
    assert "--load-format dummy" in command and "--generation-config vllm" in command


@pytest.mark.vllm
def test_a_server_for_another_student_is_refused_by_name(rl_data, served, tmp_path):
    """rollout.vllm.urls: the served config.json is checked against the student's before any
    transfer group is formed."""
    from mimo_train.rl.vllm_rollout import VLLMRollout

    other = make_student(rl_data, tmp_path / "other", intermediate=96)
    config = ds_config(rl_data, other, tmp_path / "run", f"rollout.vllm.urls=['{served.clients[0].url}']")
    with pytest.raises(ValueError, match=r"not this run's model: intermediate_size: server 128, student 96\. "
                                         r"Start it from trainer\.model_dir"):
        VLLMRollout(config, max_len=64)


@pytest.mark.vllm
def test_zero3_weights_streamed_from_two_ranks_are_what_the_server_computes(rl_data, student, served, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(rl_data / "tokenizer"))
    seq = tok.encode("sort:dwbd=bddw rev:odzp=pzdo 37+195=232")
    assert len(seq) > 20 and max(seq) < len(tok)
    (tmp_path / "seq.json").write_text(json.dumps(seq))
    code, out = launch([str(tmp_path), str(student), str(rl_data), served.clients[0].url, str(BUCKET_MB)], nproc=2,
                       script=WORKER)
    assert code == 0, out[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())

    bound = int(BUCKET_MB * (1 << 20))
    sender, other = result["ranks"]
    assert 0 < sender["sync/largest_bucket_bytes"] <= bound and other["sync/largest_bucket_bytes"] == 0
    assert sender["sync/bytes"] == result["model_bytes"] and sender["sync/buckets"] > 10
    # Each gather held one bucket's tensors, or one tensor larger than a bucket (the largest: the
    # 256 x 64 embedding, and lm_head), never the model.
    largest_tensor = 256 * 64 * 4
    for rank in (sender, other):
        assert 0 < rank["largest_gather_bytes"] <= max(bound, largest_tensor) < result["model_bytes"] / 4

    served_lp = torch.tensor(result["served"])
    engine = token_logprobs(hf_model(student, tmp_path / "engine.safetensors"), seq)
    files = token_logprobs(hf_model(student), seq)
    # Both in fp32; vLLM's CPU kernels sum in another order than transformers' eager ones: 4.8e-7
    # measured (`pytest tests/rl/test_vllm_deepspeed.py`), the bound 20 times that. A tensor the stream
    # missed would keep vLLM's dummy values, and one sent under the wrong name would fail to load.
    assert (served_lp - engine).abs().max() < 1e-5, (served_lp - engine).abs().max()
    assert (served_lp - files).abs().max() > 1e4 * 1e-5  # control: the student's files give other log-probs (1.26)

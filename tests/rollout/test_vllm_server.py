"""A real vLLM server fed by our weight streaming (the trainer's side in this process): after an
update it computes the trainer's log-probs; its greedy MTP decoding gives our engine's tokens;
a draft-only update changes acceptance and not one token; a one-worker server is two processes
on the threads it was given."""

from pathlib import Path

import pytest
import torch

from mimo_train.model.gpt import build_model
from mimo_train.rl.vllm_weight_sync import VLLMWeightSync
from mimo_train.rl.weight_gather import gather_serving_weights
from mimo_train.rl.weight_stream import MegatronWeights, ServingGeometry
from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from mimo_train.rollout.vllm.client import VLLMClient, spec_delta
from mimo_train.rollout.vllm.server import server_env
from tests.rollout.vllm_utils import chain_model, group_members, server_groups, start_server, tiny32, vllm

pytestmark = vllm
K = 3


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer_dir, megatron_single):
    cfg = tiny32()
    server = start_server(tmp_path_factory.mktemp("vllm_server"), cfg, tokenizer_dir, spec_depth=K)
    client = VLLMClient(server.url, describe=server.describe())
    sync = VLLMWeightSync([client], MegatronWeights(cfg, torch.float32, ServingGeometry(pad_v_head=True)),
                          drafter=True, bucket_bytes=64 << 10)
    yield cfg, client, sync, server
    server.stop()


def model_with(cfg, seed: int, shape=None):
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for name, b in model.named_buffers():
            if "expert_bias" in name:
                b.normal_(0, 0.1)
    if shape:
        shape(model)
    return model.eval()


def prompt_logprobs(client: VLLMClient, seq: list[int]) -> torch.Tensor:
    body = {"model": client.model, "prompt": [seq], "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0}
    rows = client.call("POST", "/v1/completions", body)["choices"][0]["prompt_logprobs"][1:]
    return torch.tensor([row[str(t)]["logprob"] for row, t in zip(rows, seq[1:])])


def test_an_update_makes_vllm_compute_the_trainers_logprobs(served):
    cfg, client, sync, _ = served
    model = model_with(cfg, seed=0)
    seq = torch.randint(3, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()  # > window
    with torch.no_grad():
        ours = model(torch.tensor([seq])).logits[0][0, :-1].log_softmax(-1)
    ours = ours.gather(1, torch.tensor(seq[1:])[:, None]).squeeze(1)
    before = prompt_logprobs(client, seq)  # the server's dummy weights
    stats = sync.push([model], version=5)
    after = prompt_logprobs(client, seq)
    assert (before - ours).abs().max() > 0.1
    assert (after - ours).abs().max() <= 1e-4, (after - ours).abs().max()
    assert client.weight_version() == "5"
    assert 0 < stats["sync/largest_bucket_bytes"] <= 64 << 10 and stats["sync/buckets"] > 2


def greedy(client: VLLMClient, prompts):
    params = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    before = [client.spec_counters()]
    tokens = [client.complete(p, params, seed=None).tokens for p in prompts]
    drafts, accept_length, _ = spec_delta(before, [client.spec_counters()])
    assert drafts > 0
    return tokens, accept_length


def test_greedy_mtp_decoding_gives_our_engines_tokens_and_a_draft_update_changes_only_acceptance(served):
    cfg, client, sync, _ = served
    model = model_with(cfg, seed=2, shape=chain_model)
    sync.push([model], version=6)
    prompts = [[1, 17, 40], [1, 99, 5, 7, 200]]
    engine = Engine(cfg, gather_serving_weights([model], cfg), EngineConfig(device="cpu", max_batch=2, max_len=64))
    ours, metrics = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True),
                                    depth=K)
    tokens, accept = greedy(client, prompts)
    assert tokens == [c.tokens for c in ours]
    assert metrics.mean_accept_length > 3.5 and accept > 3.5  # the drafter is exact by construction

    noisy = model_with(cfg, seed=2, shape=chain_model)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if name.startswith("mtp.") and name.endswith("eh_proj.weight"):
                p.normal_(0, 0.3)
    sync.push([noisy], version=7, draft_only=True)
    tokens_after, accept_after = greedy(client, prompts)
    assert tokens_after == tokens
    assert accept_after < 2.0
    assert client.weight_version() == "7"


def test_one_worker_runs_inside_the_engine_core_on_the_threads_it_was_given(served, monkeypatch):
    """vLLM's CPU platform would start the worker as a third process (a third import of vLLM);
    the server keeps it in the engine core. Its threads are the spec's, not the caller's
    OMP_NUM_THREADS (torchrun sets 1 for the trainer's ranks)."""
    server = served[3]
    members = group_members(server_groups(str(server.spec.model)))
    vllm_processes = [m for m in members if "resource_tracker" not in m]  # multiprocessing's own helper
    assert len(vllm_processes) == 2 and any("EngineCore" in m for m in vllm_processes), members
    # The engine core inherits the API server's environment (setproctitle blanks its own copy).
    api_server = next(m for m in vllm_processes if "api_server" in m)
    environ = Path(f"/proc/{api_server.split(':')[0]}/environ").read_bytes().split(b"\0")
    assert b"VLLM_ENABLE_V1_MULTIPROCESSING=0" in environ  # else vLLM's CPU platform overrides the next
    assert "--distributed-executor-backend uni" in " ".join(server.spec.command())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert "OMP_NUM_THREADS" not in server_env(worker_in_engine=True, cpu_threads=0)  # torch's default: every core
    assert server_env(worker_in_engine=True, cpu_threads=3)["OMP_NUM_THREADS"] == "3"
    assert server_env(worker_in_engine=True)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in server_env(worker_in_engine=False)  # tensor parallel: vLLM's own

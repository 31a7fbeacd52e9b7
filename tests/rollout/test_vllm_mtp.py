"""vLLM drafts with every MTP layer once our plugin is installed (no change to vLLM: its plugin
entry point loads it): the drafts are our engine's (the same acceptance at every draft position,
greedy, same prompts), changing MTP layer 2 changes the drafts at K=3 and not at K=1, and the
greedy tokens are stock vLLM's and ours. Stock vLLM (MIMO_VLLM_STOCK_MTP=1) reuses layer 0
for every draft: the control."""

import pytest
import torch

from mimo_train.rl.vllm_weight_sync import VLLMWeightSync
from mimo_train.rl.weight_gather import gather_serving_weights
from mimo_train.rl.weight_stream import MegatronWeights, ServingGeometry
from mimo_train.rollout import Engine, EngineConfig, SamplingParams
from mimo_train.rollout.vllm.client import VLLMClient, spec_delta
from mimo_train.rollout.vllm.server import ServerSpec, VLLMServer, write_model_dir
from tests.rollout.test_vllm_server import model_with
from tests.rollout.vllm_utils import VLLM_PYTHON, chain_model, need_vllm, tiny32, vllm

pytestmark = vllm
NEW_TOKENS = 40
PROMPTS = [[1, 17, 40], [1, 99, 5, 7, 200], [1, 3], [1, 250, 251, 252, 8, 9, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tokenizer_dir, megatron_single):
    """{name: (client, sync)}: our drafter at K=3 and K=1, vLLM's own at K=3; started side by side."""
    need_vllm()
    cfg = tiny32()
    root = tmp_path_factory.mktemp("vllm_mtp")
    model = write_model_dir(root / "model", cfg, tokenizer_dir, pad_v_head=True)
    kinds = {"ours3": (3, False), "ours1": (1, False), "stock3": (3, True)}
    started = {}
    try:
        for name, (k, stock) in kinds.items():
            spec = ServerSpec(python=str(VLLM_PYTHON), model=model, port=0, log=root / f"{name}.log",
                              max_model_len=128, max_num_seqs=8, spec_depth=k, kv_cache_bytes=64 << 20, stock_mtp=stock)
            started[name] = VLLMServer(spec).start()
        out = {}
        for name, server in started.items():
            server.wait_ready(600)
            client = VLLMClient(server.url, describe=server.describe())
            source = MegatronWeights(cfg, torch.float32, ServingGeometry(pad_v_head=True))
            out[name] = client, VLLMWeightSync([client], source, drafter=True,
                                               bucket_bytes=1 << 20)
        yield cfg, out, root
    finally:
        for server in started.values():
            server.stop()


def push(servers, model, version: int, draft_only: bool = False) -> None:
    for _, sync in servers.values():
        sync.push([model], version=version, draft_only=draft_only)


def vllm_greedy(client: VLLMClient):
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    before = [client.spec_counters()]
    tokens = [client.complete(p, params, seed=None).tokens for p in PROMPTS]
    drafts, accept, per_position = spec_delta(before, [client.spec_counters()])
    return tokens, accept, per_position, drafts


def our_greedy(cfg, model, k: int):
    engine = Engine(cfg, gather_serving_weights([model], cfg), EngineConfig(device="cpu", max_batch=4, max_len=128))
    done, metrics = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True),
                                    depth=k)
    return [c.tokens for c in done], metrics.mean_accept_length, metrics.acceptance_per_position


def partial_drafter(cfg, seed: int, scales: dict[int, float]):
    """The known-good chain drafter whose chosen MTP layers also attend and run their FFN
    (random output projections of size scales[k] in layer k) on top of the next token's embedding they pass
    on: a draft is right when what attention over that layer's keys adds does not outweigh the
    embedding, so acceptance at each position depends on every layer's keys."""
    model = model_with(cfg, seed=2, shape=chain_model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            for k, scale in scales.items():
                if name.startswith(f"mtp.layers.{k}.") and name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                    p.copy_(scale * torch.randn(p.shape, generator=gen))
    return model


def test_the_plugin_is_what_drafts(servers):
    _, _, root = servers
    assert "chained MTP drafter, 3 layers" in (root / "ours3.log").read_text()
    assert "chained MTP drafter, 1 layers" in (root / "ours1.log").read_text()
    assert "chained MTP drafter" not in (root / "stock3.log").read_text()


def test_drafts_are_our_engines_at_every_position(servers):
    cfg, clients, _ = servers
    # Layers 1 and 2 noisier than layer 0: ours accepts about 0.96 / 0.63 / 0.25 per position.
    model = partial_drafter(cfg, seed=0, scales={0: 0.0005, 1: 0.003, 2: 0.006})
    push(clients, model, version=1)
    ours_tokens, ours_accept, ours_per_position = our_greedy(cfg, model, 3)
    tokens, accept, per_position, drafts = vllm_greedy(clients["ours3"][0])
    stock_tokens, stock_accept, stock_per_position, _ = vllm_greedy(clients["stock3"][0])
    assert tokens == ours_tokens == stock_tokens  # lossless, whoever drafts
    assert 0.1 < ours_per_position[2] < 0.9  # every position is sometimes accepted, sometimes not
    # Our engine counts only drafts whose tokens reach the request; vLLM's counters also count
    # those accepted in a request's last step past its length limit: at most one per position
    # and request, so vLLM's figures may exceed ours by up to that much, never fall below.
    past_limit = len(PROMPTS) / drafts
    assert -0.05 <= accept - ours_accept <= 0.05 + 3 * past_limit, (accept, ours_accept, drafts)
    for a, b in zip(per_position, ours_per_position):
        assert -0.03 <= a - b <= 0.03 + past_limit, (per_position, ours_per_position, drafts)
    # The control: vLLM's own drafter (the least noisy layer 0, three times) drafts something else.
    assert stock_per_position[2] > ours_per_position[2] + 0.3, (stock_per_position, ours_per_position)


def test_mtp_layer_2_changes_drafts_at_k3_and_not_at_k1(servers):
    cfg, clients, _ = servers
    clean = model_with(cfg, seed=2, shape=chain_model)
    push(clients, clean, version=2)
    before = {name: vllm_greedy(client) for name, (client, _) in clients.items()}
    assert before["ours3"][2] == [1.0, 1.0, 1.0] and before["ours1"][2] == [1.0]  # an exact drafter
    push(clients, partial_drafter(cfg, seed=1, scales={2: 0.03}), version=3, draft_only=True)
    after = {name: vllm_greedy(client) for name, (client, _) in clients.items()}
    assert after["ours3"][2][:2] == [1.0, 1.0] and after["ours3"][2][2] < 0.8, after["ours3"][2]
    assert after["ours1"][1:] == before["ours1"][1:]  # K=1 never runs layer 2
    assert after["stock3"][1:] == before["stock3"][1:]  # vLLM's drafter never runs it either
    assert all(after[name][0] == before[name][0] for name in clients)  # and no token changed

"""A vLLM server that cannot start says why in one error naming its command and its log, and
leaves nothing running: a port in use or a missing vLLM environment before anything starts, a
bad model directory, a KV cache larger than the machine or MTP drafts of a model our drafter
cannot compute (mtp_feed=target_hidden) once vLLM has tried."""

import json
import socket

import pytest

from mimo_train.rollout.vllm.server import ServerError, ServerSpec, VLLMServer, write_model_dir
from tests.rollout.vllm_utils import VLLM_PYTHON, group_members, need_vllm, server_groups, tiny32, vllm


@pytest.fixture
def spec(tmp_path, tokenizer_dir):
    def make(**kw) -> ServerSpec:
        model = write_model_dir(tmp_path / "model", tiny32(), tokenizer_dir, pad_v_head=True)
        # port 0: a free port, picked again if another process takes it before vLLM binds it
        # (a fixed free_port() lost that race once in the suite: "Address already in use").
        return ServerSpec(**{"python": str(VLLM_PYTHON), "model": model, "port": 0,
                             "log": tmp_path / "server.log", "kv_cache_bytes": 64 << 20, "max_model_len": 64, **kw})
    return make


def test_a_port_in_use_is_refused_before_starting(spec):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ServerError, match=rf"port {s.getsockname()[1]} on 127.0.0.1 is in use: set rollout.vllm.port"):
            VLLMServer(spec(port=s.getsockname()[1])).start()


@vllm
def test_a_picked_port_taken_before_the_server_binds_it_is_picked_again(spec):
    """port=0 picks a free port; another process can take it before vLLM binds it (seen in the
    suite): the server starts again on another, instead of failing."""
    need_vllm()
    server = VLLMServer(spec(port=0)).start()
    taken = server.spec.port
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", taken))  # before vLLM, which needs seconds of imports to reach its bind
            s.listen()
            server.wait_ready(600)
            assert server.spec.port != taken
            assert f"port {taken} was taken before the server bound it" in server.spec.log.read_text()
    finally:
        server.stop()


def test_a_missing_vllm_environment_names_make_setup(spec, tmp_path):
    with pytest.raises(ServerError, match=r"no vLLM environment at .*: run `make setup`"):
        VLLMServer(spec(python=str(tmp_path / "nowhere" / "python"))).start()


@vllm
@pytest.mark.parametrize("fault,expected", [
    ("bad_model_dir", r"vLLM server did not start \(exit code \d+\): \w+Error: .*; command `.*--model .*` \(log: .*server.log\)"),
    ("out_of_memory", r"vLLM server did not start .*Available memory.*; command `.*--kv-cache-memory-bytes .*`"),
    # Our drafter (like vLLM's) chains the MTP layers: a model trained unchained is refused.
    ("target_hidden", r"vLLM server did not start .*mtp_feed='target_hidden'.*chains the MTP layers"),
], ids=["bad-model-dir", "out-of-memory", "target-hidden-drafts"])
def test_a_server_that_fails_to_start_says_why_and_leaves_nothing(fault, expected, spec):
    need_vllm()
    s = spec(spec_depth=3) if fault == "target_hidden" else spec()
    if fault == "bad_model_dir":
        (s.model / "config.json").write_text(json.dumps({"architectures": ["NotAModel"], "model_type": "nope"}))
    elif fault == "target_hidden":
        config = json.loads((s.model / "config.json").read_text())
        (s.model / "config.json").write_text(json.dumps({**config, "mtp_feed": "target_hidden"}))
    else:
        s.kv_cache_bytes = 1 << 50  # a petabyte
    server = VLLMServer(s).start()
    with pytest.raises(ServerError, match=expected):
        server.wait_ready(300)
    server.stop()
    assert not group_members(server_groups(str(s.model)))

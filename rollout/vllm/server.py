"""vLLM servers the run starts: the command, the model directory they serve, start-up, stop.

A server runs `vllm.entrypoints.openai.api_server` with the Python of vLLM's own virtual
environment (vLLM pins an older transformers than ours: we talk to it, never import it), under
`watchdog.py`, so that every vLLM process stops when the run stops, however it stops. A rollout
server starts from a model directory holding only config.json and the tokenizer
(`--load-format dummy`): the run streams the real weights in before the first request. A
teacher server (frozen weights) starts from a directory with its weights written out.

Its config.json is the trainer's model seen through `vllm_config`, which makes vLLM 0.32
compute the trainer's function:
  - vLLM's MiMo-V2 attends to `sliding_window_size` tokens *including* the query; transformers
    and our trainer to the query and `sliding_window_size` previous tokens. The server is given
    one more (measured: log-probs equal ours only with it, once a sequence outgrows the window).
  - with `pad_v_head` (CPU only needs it), v_head_dim is the q/k head dim; the weights are
    padded to match as they stream (`ServingGeometry`, `mimo_train.rl.weight_stream`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mimo_train.model.config import ModelConfig

WATCHDOG = Path(__file__).with_name("watchdog.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


class ServerError(RuntimeError):
    """A vLLM server that cannot start or has stopped; the message names the command and log."""


@dataclass(frozen=True)
class ServingGeometry:
    """How the served model's shapes differ from the trainer's, with the same function.

    `pad_v_head`: v_proj rows and o_proj columns zero-padded per head from v_head_dim to the
    q/k head dim (vLLM's CPU attention needs v dim == q/k dim; zero value channels meet zero
    o_proj columns, so outputs do not change). The weights are padded as they stream
    (`mimo_train.rl.weight_stream`)."""

    pad_v_head: bool = False

    @classmethod
    def for_device(cls, cfg: ModelConfig, *, cuda: bool) -> "ServingGeometry":
        """What vLLM needs: padding only on CPU, and only where the dims differ."""
        return cls(pad_v_head=not cuda and (cfg.v_head_dim != cfg.head_dim or cfg.swa_v_head_dim != cfg.swa_head_dim))

    def config(self, cfg: ModelConfig) -> ModelConfig:
        if not self.pad_v_head:
            return cfg
        return dataclasses.replace(cfg, v_head_dim=cfg.head_dim, swa_v_head_dim=cfg.swa_head_dim)

    def weights(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole serving-name tensors of `cfg` as this geometry serves them."""
        if not self.pad_v_head:
            return weights
        out = dict(weights)
        for name, t in weights.items():
            if name.endswith(PADDED):
                swa = ".mtp." in name or cfg.is_swa(int(name.split(".")[2]))
                d = cfg.attention_dims(swa=swa)
                out[name] = pad_head_channels(t, 0 if name.endswith(PADDED[0]) else 1, d["v_head_dim"], d["head_dim"])
        return out


PADDED = ("self_attn.v_proj.weight", "self_attn.o_proj.weight")  # v channels: rows of v_proj, columns of o_proj


def pad_head_channels(t: torch.Tensor, dim: int, dv: int, dk: int) -> torch.Tensor:
    """Zero-pad each head's `dv` channels along `dim` of `t` (whole heads) to `dk`."""
    heads = t.shape[dim] // dv
    split = t.reshape(*t.shape[:dim], heads, dv, *t.shape[dim + 1:])
    out = t.new_zeros(*t.shape[:dim], heads, dk, *t.shape[dim + 1:])
    out.narrow(dim + 1, 0, dv).copy_(split)
    return out.reshape(*t.shape[:dim], heads * dk, *t.shape[dim + 1:])


def vllm_config(cfg: ModelConfig, *, pad_v_head: bool) -> dict:
    """config.json for a vLLM server computing `cfg`'s function (see the module docstring)."""
    served = ServingGeometry(pad_v_head).config(cfg)
    hub = dataclasses.replace(served, sliding_window_size=cfg.sliding_window_size + 1).to_hub_dict()
    hub["torch_dtype"] = "float32"
    return hub


def write_model_dir(directory: Path, cfg: ModelConfig, tokenizer: str | Path, *, pad_v_head: bool,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """The directory a server starts from: config and tokenizer (vLLM loads one even for token
    ids in and out), and `weights` (serving names, as `cfg` has them) when given: without them
    the server starts on dummy weights for the run to stream into."""
    directory.mkdir(parents=True, exist_ok=True)
    if weights is not None:
        from safetensors.torch import save_file

        served = ServingGeometry(pad_v_head).weights(cfg, weights)
        save_file({k: v.contiguous() for k, v in served.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(vllm_config(cfg, pad_v_head=pad_v_head), indent=2) + "\n")
    ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    (directory / "generation_config.json").write_text(json.dumps({k: v for k, v in ids.items() if v is not None}))
    found = [Path(tokenizer) / n for n in TOKENIZER_FILES if (Path(tokenizer) / n).is_file()]
    if not found:
        raise FileNotFoundError(f"no tokenizer files in {tokenizer}: the vLLM server needs the run's tokenizer "
                                "(data.tokenizer)")
    for f in found:
        shutil.copy2(f, directory / f.name)
    return directory


def read_model_dir(root: str | Path | None) -> tuple[dict | None, Path | None]:
    """What this machine can see of a server's model directory: its config.json (None when not
    visible) and the directory itself when it holds a tokenizer (None otherwise)."""
    if not root:
        return None, None
    root = Path(root)
    config = json.loads((root / "config.json").read_text()) if (root / "config.json").is_file() else None
    tokenizer = root if any((root / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")) else None
    return config, tokenizer


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


@dataclass
class ServerSpec:
    python: str  # vLLM's virtual environment's interpreter
    model: Path
    port: int
    log: Path
    host: str = "127.0.0.1"
    dtype: str = "float32"
    tensor_parallel: int = 1
    expert_parallel: bool = False
    max_model_len: int = 2048
    max_num_seqs: int = 64
    spec_depth: int = 0  # MTP draft tokens per step; 0: no speculative decoding
    kv_cache_bytes: int | None = None  # CPU: the KV cache's size; None: gpu_memory_utilization decides
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = True
    seed: int = 0
    dummy_weights: bool = True  # the run streams the weights in; False: read the model directory's
    return_routed_experts: bool = False
    max_logprobs: int = 20  # the most top-k log-probs a request may ask for (vLLM's default: 20)
    stock_mtp: bool = False  # vLLM's own MTP drafter (layer 0 for every draft) instead of our plugin's
    cpu_threads: int = 0  # CPU servers' OpenMP threads; 0: torch's default (every core the process may use)
    worker_process: bool = False  # True: one worker in a process of its own too (vLLM's CPU default; cores bound)
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self):
        # port 0: a free port now, and another if it is taken by the time the server binds it
        # (VLLMServer.wait_ready; seen when other processes of the machine opened ports meanwhile).
        self.auto_port = self.port == 0
        if self.auto_port:
            self.port = free_port(self.host)
        # Absolute: the server runs in its log's directory (VLLMServer.start), where a path
        # relative to ours (a relative logging.run_dir) would name nothing.
        self.log = Path(self.log).resolve()
        if Path(self.model).exists():
            self.model = Path(self.model).resolve()

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
               "--host", self.host, "--port", str(self.port), "--dtype", self.dtype,
               "--tensor-parallel-size", str(self.tensor_parallel), "--max-model-len", str(self.max_model_len),
               "--max-num-seqs", str(self.max_num_seqs), "--seed", str(self.seed),
               "--max-logprobs", str(self.max_logprobs),
               "--logprobs-mode", "processed_logprobs",  # log-probs of the distribution sampled: after temperature
               "--weight-transfer-config", json.dumps({"backend": "mimo"})]
        if self.dummy_weights:
            cmd += ["--load-format", "dummy"]
        if self.expert_parallel:
            cmd += ["--enable-expert-parallel"]
        if self.spec_depth > 0:
            cmd += ["--speculative-config", json.dumps({"method": "mtp", "num_speculative_tokens": self.spec_depth})]
        if self.kv_cache_bytes is not None:
            cmd += ["--kv-cache-memory-bytes", str(self.kv_cache_bytes)]
        else:
            cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.enforce_eager:
            cmd += ["--enforce-eager"]
        if self.return_routed_experts:
            cmd += ["--enable-return-routed-experts"]
        if self.worker_in_engine:
            # The one worker inside the engine-core process, as vLLM runs one GPU: a server is two
            # processes, not three. vLLM's CPU platform otherwise puts it in a process of its own
            # (for OpenMP settings a spawned process can take); that is a third import of vLLM:
            # `python tools/bench_vllm_start.py` compares the two. server_env tells the CPU
            # platform to keep this choice.
            cmd += ["--distributed-executor-backend", "uni"]
        return cmd + list(self.extra_args)

    @property
    def worker_in_engine(self) -> bool:
        return self.tensor_parallel == 1 and not self.worker_process

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def server_env(routed_experts: bool = False, stock_mtp: bool = False, worker_in_engine: bool = False,
               cpu_threads: int = 0) -> dict[str, str]:
    env = {**os.environ,
           "VLLM_SERVER_DEV_MODE": "1",  # mounts the RL routes: pause, resume, weight transfer
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",  # never download anything
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "PYTHONUNBUFFERED": "1"}
    if routed_experts:  # vLLM returns routed experts only from its V2 model runner (needs Triton with a GPU)
        env["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    if worker_in_engine:
        # Read by vLLM's CPU platform, which then keeps `--distributed-executor-backend uni`
        # (ServerSpec.command); the API server still runs the engine core in a process of its own.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    else:
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    # The worker's threads are the server's choice, not inherited: torchrun gives the trainer's
    # ranks OMP_NUM_THREADS=1, which would leave a CPU server one core.
    if cpu_threads > 0:
        env["OMP_NUM_THREADS"] = str(cpu_threads)
    else:
        env.pop("OMP_NUM_THREADS", None)
    if stock_mtp:  # mimo_train_vllm then leaves vLLM's MiMo-V2 drafter in place
        env["MIMO_VLLM_STOCK_MTP"] = "1"
    else:
        env.pop("MIMO_VLLM_STOCK_MTP", None)
    # Our repository's top level holds a `kernels/` package: on vLLM's path it would hide the
    # `kernels` package transformers looks for. vLLM runs from its log directory, without ours.
    env.pop("PYTHONPATH", None)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)  # torchrun's rendezvous belongs to the trainer, not to vLLM's own processes
    return env


class VLLMServer:
    """One vLLM server process tree, started under the watchdog; `stop()` (or our death) ends it."""

    def __init__(self, spec: ServerSpec):
        self.spec = spec
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return self.spec.url

    def describe(self) -> str:
        return f"`{' '.join(self.spec.command())}` (log: {self.spec.log})"

    def start(self) -> "VLLMServer":
        s = self.spec
        if not Path(s.python).exists():
            raise ServerError(f"no vLLM environment at {s.python}: run `make setup` (it builds .venv-vllm), or set "
                              "rollout.vllm.python to the interpreter of a virtual environment with vLLM")
        while s.auto_port and port_in_use(s.host, s.port):
            s.port = free_port(s.host)
        if port_in_use(s.host, s.port):
            raise ServerError(f"port {s.port} on {s.host} is in use: set rollout.vllm.port to a free port, "
                              "or 0 to pick free ports")
        s.log.parent.mkdir(parents=True, exist_ok=True)
        s.log.write_text(f"$ {' '.join(s.command())}\n")
        from mimo_train.rollout.vllm.watchdog import die_with_parent

        env = server_env(s.return_routed_experts, s.stock_mtp, s.worker_in_engine, s.cpu_threads)
        self.proc = subprocess.Popen([sys.executable, str(WATCHDOG), str(s.log), "--", *s.command()], env=env,
                                     stdin=subprocess.DEVNULL, cwd=s.log.parent, preexec_fn=die_with_parent)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float) -> None:
        """Until GET /health answers; ServerError (with the log's last error) if the server
        exits or the time runs out."""
        deadline = time.monotonic() + timeout_s
        rebinds = 3
        while time.monotonic() < deadline:
            if not self.alive() and self.spec.auto_port and rebinds and "Address already in use" in first_error(self.spec.log):
                rebinds -= 1
                taken, self.spec.port = self.spec.port, free_port(self.spec.host)
                self.start()
                with open(self.spec.log, "a") as log:
                    log.write(f"(port {taken} was taken before the server bound it: started again on {self.spec.port})\n")
                continue
            if not self.alive():
                raise ServerError(f"vLLM server did not start (exit code {self.proc.returncode if self.proc else None}): "
                                  f"{first_error(self.spec.log)}; command {self.describe()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"vLLM server not ready after {timeout_s:.0f}s (rollout.vllm.startup_timeout_s): "
                          f"{first_error(self.spec.log)}; command {self.describe()}")

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # the watchdog stops the whole group
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# The last line of a traceback, bare or behind vLLM's "(Worker pid=N) ERROR <time> [file:line] " prefix.
_ERROR = re.compile(r"^(?:\([^)]*\) ERROR [^\]]*\] )?([A-Za-z_.]*(?:Error|Exception)): (.+)$")


def first_error(log: Path, default: str = "no error in its log") -> str:
    """The first exception a log reports: vLLM's processes print the root cause first, then
    the errors of the processes waiting on it."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return default
    for i, line in enumerate(lines):
        m = _ERROR.match(line)
        if m:
            message = m.group(2).strip()
            if "validation error" in message and i + 1 < len(lines):  # pydantic puts the reason on the next line
                message += ": " + lines[i + 1].strip()
            return f"{m.group(1).rsplit('.', 1)[-1]}: {message}"
    return default

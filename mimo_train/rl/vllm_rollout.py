"""vLLM as the rollout backend: servers in their own processes, weights streamed into them.

Rank 0 starts the servers (or connects to `rollout.vllm.urls`), waits for their health and
keeps their logs under <run_dir>/vllm/. Every trainer rank joins one weight-transfer group per
server (trainer ranks first, then the server's workers: `mimo_train_vllm.wire`) and, after
every optimizer step, sends the weights it owns (`weight_stream`): the target model first, then
the MTP layers into vLLM's drafter. Samples come back through the completions API, token ids in
and out, with the log-probs of the sampled tokens after temperature.

A DeepSpeed student (trainer.backend=deepspeed, any transformers causal LM) is served from its
own directory, trainer.model_dir, as vLLM reads it: no config of ours, no padding, no drafter,
no routed experts; its weights stream from the ZeRO engine (`zero_weights`). Its servers ignore
the student's generation_config.json (`--generation-config vllm`): vLLM would otherwise apply
its defaults (a repetition penalty, say) to requests that do not set them, and sample from
another distribution than the one the trainer scores.

Measured limits of vLLM 0.32 on CPU, refused here with the fix named: speculative sampling
(MTP drafts with temperature > 0) gives different tokens for the same seeded request from run
to run and NaN log-probs, so RL on a CPU server needs rl.spec_depth=0 (greedy MTP decoding is
exact: the benchmark uses it); routed experts come only from vLLM's V2 model runner, which
needs Triton with a GPU, so routing replay needs a GPU server.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mimo_train.parallel.rank0 import on_rank0
from mimo_train.rl.teachers import tokenizer_fingerprint
from mimo_train.rl.vllm_weight_sync import VLLMWeightSync
from mimo_train.rl.weight_stream import MegatronWeights, ServingGeometry, WeightSource
from mimo_train.rollout.api import Completion, Metrics
from mimo_train.rollout.rng import request_seed
from mimo_train.rollout.vllm.client import ServerUnavailable, VLLMClient, spec_delta
from mimo_train.rollout.vllm.server import (ServerError, VLLMServer, first_error, read_model_dir,
                                            vllm_config, write_model_dir)
from mimo_train.training.config import RunConfig
from mimo_train.training.hf_student import read_config
from mimo_train_vllm.wire import DTYPES

# What must agree between a server's config.json and the trainer's model for their functions to match.
FUNCTION_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "moe_intermediate_size",
                   "num_attention_heads", "num_key_value_heads", "head_dim", "v_head_dim", "swa_num_attention_heads",
                   "swa_num_key_value_heads", "swa_head_dim", "swa_v_head_dim", "hybrid_layer_pattern",
                   "sliding_window_size", "moe_layer_freq", "n_routed_experts", "num_experts_per_tok",
                   "add_swa_attention_sink_bias", "add_full_attention_sink_bias", "rope_theta", "swa_rope_theta",
                   "partial_rotary_factor", "attention_value_scale")
# The same for a transformers student (trainer.backend=deepspeed), read from both config.json files.
STUDENT_FIELDS = ("model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim", "tie_word_embeddings")


class VLLMRollout:
    def __init__(self, config: RunConfig, max_len: int):
        self.config, self.v, self.rl, self.cfg = config, config.rollout.vllm, config.rl, config.model
        self.max_len = max_len
        self.cuda = torch.cuda.is_available()
        self.dtype = self.v.dtype_on(self.cuda)
        self.student = config.trainer.model_dir if config.trainer.backend == "deepspeed" else None
        # A student is served as its directory says: no geometry of ours.
        self.geometry = ServingGeometry() if self.student else self.v.geometry(self.cfg, self.cuda)
        depth = self.rl.spec_depth if self.rl.spec_depth is not None else self.cfg.num_nextn_predict_layers
        self.spec_depth = min(depth, self.cfg.num_nextn_predict_layers)
        self.routes = self.cuda and any(self.cfg.moe_layer_freq)
        self._check()
        self.version = 0
        self.servers: list[VLLMServer] = []  # the ones this run started (rank 0)
        self.clients: list[VLLMClient] = []  # rank 0
        self.sync: VLLMWeightSync | None = None  # every rank
        self._ids = itertools.count()
        try:
            on_rank0(self._start_servers, share=False)
            self.sync = VLLMWeightSync(self.clients, self._weight_source(), drafter=self.spec_depth > 0,
                                       bucket_bytes=int(self.v.bucket_mb * (1 << 20)), host=self.v.transfer_host,
                                       timeout_s=self.v.transfer_timeout_s)
        except BaseException:
            self.close()
            raise

    # ---- set-up ----------------------------------------------------------------------------------
    def _weight_source(self) -> WeightSource:
        """Where the trainer's weights come from: one source per trainer kind."""
        if self.student:
            from mimo_train.rl.zero_weights import ZeroWeights

            return ZeroWeights(DTYPES[self.dtype], model_dir=self.student)
        return MegatronWeights(self.cfg, DTYPES[self.dtype], self.geometry)

    def _check(self) -> None:
        if not self.cuda and self.spec_depth > 0:
            raise ValueError(
                f"rollout.backend=vllm on CPU with rl.spec_depth={self.spec_depth}: vLLM 0.32's speculative sampling "
                "on CPU is unreliable (measured: a seeded request samples different tokens from run to run, and "
                "log-probs come back NaN), so RL sampling there must not draft: set rl.spec_depth=0 (GPU servers "
                "draft with every MTP layer)")
        if self.rl.routing_replay and any(self.cfg.moe_layer_freq) and not self.routes:
            raise ValueError(
                "rl.routing_replay=true with rollout.backend=vllm on CPU: vLLM returns routed experts only from "
                "its V2 model runner, which needs Triton with a GPU; set rl.routing_replay=false (the trainer routes "
                "by itself) or run the servers on GPUs")

    def _start_servers(self) -> None:
        """Rank 0: start (or reach) every server."""
        if self.v.urls:
            for url in self.v.urls:
                client = VLLMClient(url, timeout_s=self.v.request_timeout_s, retries=self.v.retries)
                self._check_served_model(client)
                self.clients.append(client)
        else:
            run_dir = self.config.run_dir / "vllm"
            if self.student:  # served as it is; its weights stream in like ours
                model_dir = Path(self.student).resolve()
            else:
                model_dir = write_model_dir(run_dir / "model", self.cfg, self.config.data.tokenizer,
                                            pad_v_head=self.geometry.pad_v_head)
            ports = [0 if self.v.port == 0 else self.v.port + i for i in range(self.v.servers)]  # 0: free ports
            for i, port in enumerate(ports):
                spec = self.v.server_spec(
                    cuda=self.cuda, model=model_dir, port=port, log=run_dir / f"server{i}.log",
                    tensor_parallel=self.v.tensor_parallel, expert_parallel=self.v.expert_parallel,
                    max_model_len=self.max_len + self.spec_depth + 1, max_num_seqs=self.rl.engine_max_batch,
                    spec_depth=self.spec_depth, seed=self.config.train.seed, return_routed_experts=self.routes)
                if self.student:
                    spec = dataclasses.replace(spec, extra_args=["--generation-config", "vllm", *spec.extra_args])
                self.servers.append(VLLMServer(spec).start())
            for server in self.servers:  # they start side by side; wait for each
                server.wait_ready(self.v.startup_timeout_s)
                self.clients.append(VLLMClient(server.url, timeout_s=self.v.request_timeout_s, retries=self.v.retries,
                                               describe=server.describe()))

    def _check_served_model(self, client: VLLMClient) -> None:
        """A server started elsewhere must serve this model's function (read its config.json
        when this machine can see it; otherwise the first weight update would fail on shapes)."""
        if not client.healthy():
            raise ServerUnavailable(f"vLLM server {client.url} (rollout.vllm.urls) does not answer GET /health")
        root = client.model_root()
        theirs, tokenizer = read_model_dir(root)
        if theirs is None:
            return
        if self.student:
            mine, theirs = student_facts(read_config(self.student)), student_facts(theirs)
            wrong = [f"{k}: server {theirs[k]!r}, student {mine[k]!r}" for k in STUDENT_FIELDS if theirs[k] != mine[k]]
            fix = f"Start it from trainer.model_dir ({self.student}) or a copy of it"
        else:
            mine = vllm_config(self.cfg, pad_v_head=self.geometry.pad_v_head)
            wrong = [f"{k}: server {theirs.get(k)!r}, trainer needs {mine[k]!r}" for k in FUNCTION_FIELDS
                     if theirs.get(k) != mine[k]]
            fix = "Start it from a directory written by mimo_train.rollout.vllm.server.write_model_dir (docs/vllm.md)"
        served = tokenizer_fingerprint(tokenizer)
        ours = tokenizer_fingerprint(self.config.data.tokenizer)
        if served and ours and served != ours:
            wrong.append(f"tokenizer: server {root} (fingerprint {served}), trainer {self.config.data.tokenizer} "
                         f"(fingerprint {ours})")
        if wrong:
            raise ValueError(f"vLLM server {client.url} serves {root}, which is not this run's model: "
                             f"{'; '.join(wrong)}. {fix}")

    # ---- weights ---------------------------------------------------------------------------------
    def push_weights(self, model_chunks, version: int, *, draft_only: bool = False) -> dict:
        """Every rank: stream this rank's weights into every server (target, then drafter)."""
        stats = self.sync.push(model_chunks, version, draft_only=draft_only)
        self.version = version
        return stats

    # ---- samples ---------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: list) -> tuple[list[Completion], Metrics]:
        """Rank 0: every sample of every prompt, one request each (seeded like our engine's);
        prompt i goes to server i mod servers, so its samples share that server's prefix cache."""
        jobs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            for j in range(p.n):
                seed = request_seed(p.seed, i, j) % (1 << 63) if p.seed is not None else None
                jobs.append((i, j, self.clients[i % len(self.clients)], list(prompt), p, seed))
        before = [c.spec_counters() for c in self.clients] if self.spec_depth else None
        t0 = time.perf_counter()
        workers = max(1, min(len(jobs), self.rl.engine_max_batch * len(self.clients)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(self._complete, client, prompt, p, seed) for _, _, client, prompt, p, seed in jobs]
            results = [f.result() for f in futures]
        seconds = time.perf_counter() - t0
        # Drafting is measured from the servers' Prometheus counters (`spec_counters`): a delta
        # over the whole call, for every request at once, so each Completion's `drafts` is None
        # and the RL loop reports acceptance per domain only for the native engine. (vLLM 0.32
        # can return per-request counts in the response body, under metrics.speculative_decoding,
        # when the server runs with --per-request-spec-decode-metrics; our client does not ask
        # for them yet.) Those counters also count drafts accepted past a stop token (vLLM's
        # scheduler counts the accepted drafts before it trims the output at the stop, in
        # v1/core/sched/scheduler.py), which the native engine's metrics leave out.
        completions = []
        for (i, j, _, prompt, p, _), sample in zip(jobs, results):
            completions.append(Completion(next(self._ids), i, j, prompt, sample.tokens, sample.logprobs,
                                          sample.finish_reason, self.version, self.version,
                                          self._moe_routing(sample.routed_experts, prompt, sample.tokens)))
        tokens = sum(len(c.tokens) for c in completions)
        metrics = Metrics(tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
                          prefill_tokens=sum(len(c.prompt) for c in completions))
        if before is not None:
            self._spec_metrics(metrics, before, [c.spec_counters() for c in self.clients])
        else:
            metrics.mean_accept_length = 1.0
        return completions, metrics

    def _complete(self, client: VLLMClient, prompt, params, seed):
        try:
            return client.complete(prompt, params, seed)
        except ServerUnavailable as e:
            dead = [s for s in self.servers if not s.alive()]
            if dead:
                raise ServerError(f"vLLM server {dead[0].url} has stopped: {first_error(dead[0].spec.log)}; "
                                  f"command {dead[0].describe()}") from None
            raise e

    def _spec_metrics(self, metrics: Metrics, before, after) -> None:
        drafts, metrics.mean_accept_length, metrics.acceptance_per_position = spec_delta(before, after)
        metrics.row_steps = drafts  # (request, verify step) pairs: the weight of the rates above
        metrics.depth_steps = {self.spec_depth: drafts}

    def _moe_routing(self, routed: torch.Tensor | None, prompt, tokens) -> torch.Tensor | None:
        """vLLM reports every layer ([positions, layers, k]); training replays the MoE layers."""
        if routed is None:
            return None
        moe = [i for i in range(self.cfg.num_hidden_layers) if self.cfg.is_moe(i)]
        if routed.shape[1] == self.cfg.num_hidden_layers:
            routed = routed[:, moe]
        elif routed.shape[1] != len(moe):
            raise ValueError(f"vLLM returned routed experts for {routed.shape[1]} layers; the model has "
                                    f"{self.cfg.num_hidden_layers} ({len(moe)} MoE)")
        positions = len(prompt) + len(tokens) - 1
        if routed.shape[0] != positions:
            raise ValueError(f"vLLM returned routed experts for {routed.shape[0]} positions, the sample has "
                                    f"{positions}")
        return routed

    def pause(self) -> None:
        for c in self.clients:
            c.pause()

    def resume(self) -> None:
        for c in self.clients:
            c.resume()

    def close(self) -> None:
        """Every rank: leave the transfer groups; rank 0 stops the servers it started."""
        self.sync = None
        for server in self.servers:
            server.stop()
        self.servers = []


def student_facts(hf: dict) -> dict:
    """STUDENT_FIELDS of a transformers config.json, with the defaults of its config class filled
    in (save_pretrained leaves out values equal to them, so two files of one model can differ in
    what they spell out). Only classes transformers ships are built: never remote code."""
    from transformers import CONFIG_MAPPING

    kind = hf.get("model_type")
    facts = {k: hf.get("text_config", hf).get(k) for k in STUDENT_FIELDS}
    if kind in CONFIG_MAPPING and not hf.get("auto_map"):
        config = CONFIG_MAPPING[kind].from_dict(hf)
        text = config.get_text_config()  # the sizes of a multimodal model's language part
        facts = {k: getattr(text, k, None) for k in STUDENT_FIELDS}
        facts["tie_word_embeddings"] = getattr(config, "tie_word_embeddings", None)
    facts["model_type"], facts["architectures"] = kind, hf.get("architectures")
    return facts

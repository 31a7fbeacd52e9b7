"""vLLM's side of weight streaming: a weight-transfer engine that receives buckets from every
trainer rank that owns weights (`wire.py` says how) and loads whole tensors into the model.

vLLM drives it through its RL routes: `/init_weight_transfer_engine` (join the group),
`/start_weight_update` or `/start_draft_weight_update` (main model or MTP drafter), one
`/update_weights` per round with the manifest, `/finish_weight_update`. Loading goes through
vLLM's layerwise reload, which re-runs each layer's post-load processing (on CPU, linear
weights are repacked after loading: without it an update would change parameters but not
outputs).

vLLM 0.32's MiMo-V2 models copy `attention_sink_bias` straight into the parameter instead of
through its weight loader, so layerwise reload never sees it (the layer is restored from its old
values and the sinks keep what they had). Those tensors are loaded a second time once the
reload is finished and the parameters are real again.

vLLM 0.32 on CPU prepacks MoE expert weights into its grouped-GEMM layout at the first load
only; a reload copies the new weights in unpacked, and the experts would compute garbage. The
MoE layers an update touched are prepacked again once it is finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo, WeightTransferUpdateInfo

from mimo_train_vllm import wire

LOADED_AROUND_THE_LOADER = ("attention_sink_bias",)  # see the module docstring


@dataclass
class StreamInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int  # trainer ranks come first in the group
    world_size: int  # trainer ranks + every worker of this server
    backend: str = "gloo"
    timeout_s: float = 300.0


@dataclass
class StreamUpdateInfo(WeightTransferUpdateInfo):
    buckets: list[dict] = field(default_factory=list)  # wire.Bucket.to_json(), in the order they travel


class StreamedWeightTransferEngine(WeightTransferEngine[StreamInitInfo, StreamUpdateInfo]):
    init_info_cls = StreamInitInfo
    update_info_cls = StreamUpdateInfo

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.link: wire.Link | None = None
        self.reload_after_finish: list[tuple[str, torch.Tensor]] = []
        self.moe_prefixes: set[str] = set()  # "model.layers.3.mlp." of every MoE layer this update loaded

    def init_transfer_engine(self, init_info: StreamInitInfo) -> None:
        p = self.parallel_config
        rank = init_info.rank_offset + p.data_parallel_index * p.world_size + p.rank
        self.link = wire.Link(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                              backend=init_info.backend, timeout_s=init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self.reload_after_finish, self.moe_prefixes = [], set()
        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        if self.reload_after_finish:
            self.model.load_weights(self.reload_after_finish)
        self._prepack_cpu_experts()
        self.reload_after_finish, self.moe_prefixes = [], set()

    def _prepack_cpu_experts(self) -> None:
        if not self.moe_prefixes:
            return
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

        for name, module in self.model.named_modules():
            kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
            experts = getattr(kernel, "fused_experts", None)
            if (isinstance(experts, CPUUnquantizedExperts) and not getattr(experts, "_use_zentorch", False)
                    and any(name.startswith(p) for p in self.moe_prefixes)):
                experts.process_weights_after_loading(module)

    def update_weights(self, update_info: dict) -> None:
        # The base class synchronises the accelerator afterwards, which raises on a CPU worker;
        # gloo receives are complete when they return, NCCL ones are synchronised here.
        self.receive_weights(self.parse_update_info(update_info))
        if self.link is not None and self.link.backend == "nccl":
            torch.cuda.synchronize()

    def receive_weights(self, update_info: StreamUpdateInfo) -> None:
        if self.link is None:
            raise RuntimeError("weight transfer not initialised: POST /init_weight_transfer_engine first")
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        def load(name: str, tensor: torch.Tensor) -> None:
            tensor = tensor.to(self.device)
            if ".mlp.experts." in name:
                self.moe_prefixes.add(name[:name.index(".mlp.experts.") + len(".mlp.")])
            if name.endswith(LOADED_AROUND_THE_LOADER):
                self.reload_after_finish.append((name, tensor.clone()))
            self.model.load_weights([(name, tensor)])

        with disable_mtp_completeness_check():  # a drafter update carries only the drafter's weights
            wire.receive(self.link, [wire.Bucket.from_json(b) for b in update_info.buckets], load)

    def shutdown(self) -> None:
        self.link = None

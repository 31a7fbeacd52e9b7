"""mimo-train's vLLM plugin (loaded by vLLM in every one of its processes).

`register` adds the weight-transfer engine "mimo" (`mimo_train_vllm.transfer`) to vLLM's
factory, so `vllm serve ... --weight-transfer-config '{"backend": "mimo"}'` receives weights
streamed from the trainer ranks that own them, and replaces vLLM's MiMo-V2 MTP drafter (one
layer reused for every draft) with one that drafts with every MTP layer as they were trained
(`mimo_train_vllm.mtp`; MIMO_VLLM_STOCK_MTP=1 keeps vLLM's). Registration is lazy: vLLM is
imported only inside vLLM's processes, and the trainer's environment can import
`mimo_train_vllm.wire`.
"""

ENGINE = "mimo"


def register() -> None:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if ENGINE not in WeightTransferEngineFactory._registry:  # vLLM loads plugins once per process, maybe more
        WeightTransferEngineFactory.register_engine(ENGINE, "mimo_train_vllm.transfer", "StreamedWeightTransferEngine")
    from mimo_train_vllm import mtp

    mtp.install()

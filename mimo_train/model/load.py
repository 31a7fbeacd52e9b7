"""`load_hf`: a serving-format checkpoint directory as our megatron-core model, in one process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from megatron.core import parallel_state
from safetensors import safe_open

from mimo_train.model.config import ModelConfig
from mimo_train.model.gpt import MiMoGPTModel, build_model
from mimo_train.model.hf_mapping import from_hf, to_hf
from mimo_train.model.spec import MegatronOptions


def safetensors_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory, checked to exist before anything is read."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = [path / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise FileNotFoundError(f"{index} points to missing shard(s) {absent} in {path}")
        return files
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors or model.safetensors.index.json "
                            "(only safetensors are loaded)")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every weight of a serving directory under its serving name, as stored, except that
    block-FP8 weights (`tools/export.py --fp8`, the FP8 release) come back dequantised to fp32
    and without their `*_scale_inv` tensors (`convert.fp8.dequantize_state`, the rule the
    importer uses). Every loader of serving directories reads through here (`load_hf`,
    `Engine.from_pretrained`, `policy_io.read_policy`: the teachers, `tools/serve_teacher.py`,
    `tools/evaluate.py`), so all of them accept FP8 directories. Dequantising on load is the
    design, not a stopgap: our layers and the engine's matmuls take bf16/fp32 weights (no FP8
    matmul here, and none at all on CPU), so each loader then casts to its own dtype."""
    from mimo_train.convert import fp8

    path = Path(path)
    weights = {}
    for file in safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    weights[name] = f.get_tensor(name)
        except Exception as e:  # safetensors reports truncation as a bare deserialisation error
            raise ValueError(f"cannot read {file}: {e} (truncated or not a safetensors file?)") from e
    config = path / "config.json"
    quant = json.loads(config.read_text()).get("quantization_config") if config.exists() else None
    quantised = quant is not None or any(n.endswith(fp8.SCALE_SUFFIX) for n in weights) \
        or any(t.dtype.is_floating_point and t.element_size() == 1 for t in weights.values())
    if quantised:
        try:
            weights = fp8.dequantize_state(weights, quant)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
    return weights


def config_for_weights(path: Path, weights: dict[str, torch.Tensor]) -> ModelConfig:
    raw = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else None
    if raw is None:
        raise FileNotFoundError(f"no config.json in {path}")
    if "num_nextn_predict_layers" not in raw:  # transformers' config has no MTP field
        mtp = {int(m.group(1)) for k in weights if (m := re.match(r"model\.mtp\.layers\.(\d+)\.", k))}
        raw["num_nextn_predict_layers"] = len(mtp)
    return ModelConfig.from_hub_dict(raw)


class MiMoHandle:
    """Our model in eval mode; `handle(input_ids)` returns logits [batch, seq, vocab]."""

    def __init__(self, model: MiMoGPTModel, config: ModelConfig):
        self.model, self.config = model, config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def all_logits(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every depth: [main, MTP layer 0, MTP layer 1, ...], each [b, s, vocab]."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if int(input_ids.max()) >= self.config.vocab_size or int(input_ids.min()) < 0:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        return self.model(input_ids.to(self.device)).logits

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.all_logits(input_ids)[0]

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return to_hf(self.model.state_dict(), self.config)


def load_hf(path: str | Path, *, device: str | None = None, dtype: torch.dtype | None = None) -> MiMoHandle:
    """Load a checkpoint directory in the serving format (or written by transformers'
    `save_pretrained` of `MiMoV2FlashForCausalLM`) as our model, in eval mode.

    Sets up a one-rank process group when none exists. Weights are read from safetensors only.
    """
    from mimo_train.parallel.setup import init_distributed

    path = Path(path)
    weights = read_weights(path)
    cfg = config_for_weights(path, weights)
    if not parallel_state.model_parallel_is_initialized():
        init_distributed()
    elif (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size(),
          parallel_state.get_expert_model_parallel_world_size()) != (1, 1, 1):
        raise RuntimeError("load_hf builds a whole model in one process; it cannot run under TP/PP/EP > 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = build_model(cfg, MegatronOptions(bf16=dtype == torch.bfloat16))
    ours = from_hf(weights, cfg)
    state = model.state_dict()
    for name, tensor in ours.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not match the config's "
                             f"{tuple(state[name].shape)} (config.json and weights disagree)")
    missing, unexpected = model.load_state_dict({k: v.to(state[k].dtype) for k, v in ours.items()}, strict=False)
    left = [m for m in missing if not m.endswith("_extra_state") and "local_tokens_per_expert" not in m]
    if left or unexpected:
        raise RuntimeError(f"internal mapping error: missing {left}, unexpected {unexpected}")
    model.to(device).eval()
    return MiMoHandle(model, cfg)

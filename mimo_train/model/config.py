"""`ModelConfig`: the one source of truth for the sizes of a MiMo-V2-Flash-style model.

Field names follow the hub `config.json` of the release (docs/architecture.md), so a
config round-trips through `to_hub_dict` / `from_hub_dict` unchanged. `from_hub_dict` also
reads the field names of transformers' `MiMoV2FlashConfig` (`layer_types`, `mlp_layer_types`,
`sliding_window`, `rope_parameters`, `rms_norm_eps`), and `to_hub_dict` writes both sets so
that transformers, SGLang and vLLM read the same model from one file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

GLOBAL, SWA = 0, 1  # values of `hybrid_layer_pattern`
DENSE, MOE = 0, 1  # values of `moe_layer_freq`
MTP_FEEDS = ("chained", "target_hidden")  # values of `mtp_feed`

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


@dataclass
class ModelConfig:
    vocab_size: int = 152576
    hidden_size: int = 4096
    num_hidden_layers: int = 48
    intermediate_size: int = 16384  # dense FFN: layer 0 and every MTP layer
    moe_intermediate_size: int = 2048
    # Attention. Global layers use the plain names, sliding-window (SWA) layers the swa_ ones.
    num_attention_heads: int = 64
    num_key_value_heads: int = 4
    head_dim: int = 192  # q and k
    v_head_dim: int = 128
    swa_num_attention_heads: int = 64
    swa_num_key_value_heads: int = 8
    swa_head_dim: int = 192
    swa_v_head_dim: int = 128
    hybrid_layer_pattern: list[int] = field(default_factory=list)  # [] -> release pattern
    sliding_window_size: int = 128  # previous tokens a SWA query sees, besides itself
    add_swa_attention_sink_bias: bool = True
    add_full_attention_sink_bias: bool = False
    rope_theta: float = 5_000_000.0
    swa_rope_theta: float = 10_000.0
    partial_rotary_factor: float = 0.334
    attention_value_scale: float = 0.707
    # MoE
    moe_layer_freq: list[int] = field(default_factory=list)  # [] -> layer 0 dense, rest MoE
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    # MTP
    num_nextn_predict_layers: int = 3
    # Which hidden state MTP layer k reads (docs/architecture.md, "Which hidden state feeds the
    # chain"): "chained" = layer k-1's output after its final_layernorm (the main model's output
    # after its final norm for k = 0): megatron-core's and vLLM's; "target_hidden" = the main
    # model's hidden state *before* its final norm, for every layer: SGLang's multi-layer MiMo
    # path. Not in the release config.json: absent means chained.
    mtp_feed: str = "chained"
    # Generic
    layernorm_epsilon: float = 1e-5
    max_position_embeddings: int = 262144
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        n = self.num_hidden_layers
        if not self.hybrid_layer_pattern:
            self.hybrid_layer_pattern = [GLOBAL if i == 0 or (i + 1) % 6 == 0 else SWA for i in range(n)]
        if not self.moe_layer_freq:
            self.moe_layer_freq = [DENSE] + [MOE] * (n - 1)
        self.hybrid_layer_pattern = [int(x) for x in self.hybrid_layer_pattern]
        self.moe_layer_freq = [int(x) for x in self.moe_layer_freq]
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

        n = self.num_hidden_layers
        need(n >= 1, f"num_hidden_layers must be >= 1, got {n}")
        need(len(self.hybrid_layer_pattern) == n,
             f"hybrid_layer_pattern has {len(self.hybrid_layer_pattern)} entries for {n} layers")
        need(set(self.hybrid_layer_pattern) <= {GLOBAL, SWA}, "hybrid_layer_pattern holds 0 (global) or 1 (SWA)")
        need(len(self.moe_layer_freq) == n, f"moe_layer_freq has {len(self.moe_layer_freq)} entries for {n} layers")
        need(set(self.moe_layer_freq) <= {DENSE, MOE}, "moe_layer_freq holds 0 (dense) or 1 (MoE)")
        for kind, heads, kv in (("global", self.num_attention_heads, self.num_key_value_heads),
                                ("SWA", self.swa_num_attention_heads, self.swa_num_key_value_heads)):
            need(kv >= 1 and heads % kv == 0, f"{kind} attention: {heads} heads not divisible by {kv} kv heads")
        need(self.swa_num_attention_heads == self.num_attention_heads,
             "swa_num_attention_heads must equal num_attention_heads (o_proj is shared in shape)")
        for name in ("head_dim", "swa_head_dim"):
            rot = int(getattr(self, name) * self.partial_rotary_factor)
            need(rot % 2 == 0 and rot > 0,
                 f"int({name} * partial_rotary_factor) = {rot} must be a positive even number")
        need(self.sliding_window_size >= 1, "sliding_window_size must be >= 1")
        if MOE in self.moe_layer_freq:
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, n_routed_experts={self.n_routed_experts}]")
            need(self.n_routed_experts % self.n_group == 0, "n_routed_experts must be divisible by n_group")
            need(1 <= self.topk_group <= self.n_group, "topk_group must be in [1, n_group]")
        need(self.scoring_func == "sigmoid", f"only scoring_func 'sigmoid' is supported, got {self.scoring_func!r}")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0")
        need(self.mtp_feed in MTP_FEEDS, f"mtp_feed must be one of {MTP_FEEDS}, got {self.mtp_feed!r}")
        need(not self.tie_word_embeddings, "tie_word_embeddings must be false (MiMo-V2-Flash unties them)")
        need(self.hidden_act == "silu", f"only hidden_act 'silu' (SwiGLU) is supported, got {self.hidden_act!r}")

    # ---- per-layer views --------------------------------------------------------------------
    def is_swa(self, layer: int) -> bool:
        return self.hybrid_layer_pattern[layer] == SWA

    def is_moe(self, layer: int) -> bool:
        return self.moe_layer_freq[layer] == MOE

    def attention_dims(self, swa: bool) -> dict[str, Any]:
        """Everything one attention layer of the given kind needs; MTP layers use swa=True."""
        head_dim = self.swa_head_dim if swa else self.head_dim
        return dict(
            num_heads=self.swa_num_attention_heads if swa else self.num_attention_heads,
            num_kv_heads=self.swa_num_key_value_heads if swa else self.num_key_value_heads,
            head_dim=head_dim,
            v_head_dim=self.swa_v_head_dim if swa else self.v_head_dim,
            rotary_dim=int(head_dim * self.partial_rotary_factor),
            rope_theta=self.swa_rope_theta if swa else self.rope_theta,
            window=self.sliding_window_size if swa else None,
            sinks=self.add_swa_attention_sink_bias if swa else self.add_full_attention_sink_bias,
            value_scale=self.attention_value_scale,
        )

    # ---- hub config.json ----------------------------------------------------------------------
    def to_hub_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(
            model_type="mimo_v2_flash",
            architectures=["MiMoV2FlashForCausalLM"],
            torch_dtype="bfloat16",
            # transformers' MiMoV2FlashConfig names, so that it builds the same model. It has one
            # kv-head count (SWA layers get twice it) and one head dim for both layer kinds.
            layer_types=["sliding_attention" if s else "full_attention" for s in self.hybrid_layer_pattern],
            mlp_layer_types=["sparse" if m else "dense" for m in self.moe_layer_freq],
            sliding_window=self.sliding_window_size + 1,
            rms_norm_eps=self.layernorm_epsilon,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": self.rope_theta,
                                   "partial_rotary_factor": self.partial_rotary_factor},
                "sliding_attention": {"rope_type": "default", "rope_theta": self.swa_rope_theta,
                                      "partial_rotary_factor": self.partial_rotary_factor},
            },
        )
        return d

    def transformers_compatible(self) -> list[str]:
        """Reasons transformers' MiMoV2FlashConfig cannot express this config (empty if it can)."""
        why = []
        if self.swa_num_key_value_heads != 2 * self.num_key_value_heads:
            why.append("transformers gives SWA layers exactly 2x the global kv heads")
        if (self.swa_head_dim, self.swa_v_head_dim) != (self.head_dim, self.v_head_dim):
            why.append("transformers uses one head_dim / v_head_dim for both layer kinds")
        if self.add_full_attention_sink_bias or not self.add_swa_attention_sink_bias:
            why.append("transformers puts sinks on SWA layers only, always")
        if self.n_group != 1 and self.n_routed_experts // self.n_group < 2:
            why.append("group routing needs >= 2 experts per group")
        return why

    @classmethod
    def from_hub_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if "num_hidden_layers" not in d:
            raise ValueError("config.json has no num_hidden_layers: is this a MiMo-V2-Flash config?")
        if d.get("model_type", "mimo_v2_flash") != "mimo_v2_flash":
            raise ValueError(f"config.json has model_type {d['model_type']!r}, expected 'mimo_v2_flash'")
        # transformers' names, used where the hub names are absent.
        if "hybrid_layer_pattern" not in d and d.get("layer_types"):
            d["hybrid_layer_pattern"] = [SWA if t == "sliding_attention" else GLOBAL for t in d["layer_types"]]
        if "moe_layer_freq" not in d and d.get("mlp_layer_types"):
            d["moe_layer_freq"] = [MOE if t == "sparse" else DENSE for t in d["mlp_layer_types"]]
        if "sliding_window_size" not in d and d.get("sliding_window") is not None:
            d["sliding_window_size"] = d["sliding_window"] - 1  # transformers counts the query itself
        if "layernorm_epsilon" not in d and "rms_norm_eps" in d:
            d["layernorm_epsilon"] = d["rms_norm_eps"]
        rope = d.get("rope_parameters") or {}
        if "full_attention" in rope:
            d.setdefault("rope_theta", rope["full_attention"]["rope_theta"])
            d.setdefault("partial_rotary_factor", rope["full_attention"].get("partial_rotary_factor", 0.334))
        if "sliding_attention" in rope:
            d.setdefault("swa_rope_theta", rope["sliding_attention"]["rope_theta"])
        if "swa_num_key_value_heads" not in d and "layer_types" in d and "num_key_value_heads" in d:
            d["swa_num_key_value_heads"] = 2 * d["num_key_value_heads"]  # transformers' rule
        for name in ("swa_num_attention_heads", "swa_head_dim", "swa_v_head_dim"):
            base = name.removeprefix("swa_")
            if name not in d and base in d:
                d[name] = d[base]
        if "layer_types" in d and "add_swa_attention_sink_bias" not in d:
            d["add_swa_attention_sink_bias"] = True
        # Absent MTP count: the file describes no MTP layers (transformers' config has none);
        # load_hf counts them from the weights instead.
        d.setdefault("num_nextn_predict_layers", 0)
        if d.get("routed_scaling_factor") is None:
            d["routed_scaling_factor"] = 1.0  # the hub stores null
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_hub_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_hub_dict(json.loads(path.read_text()))

    # ---- presets ----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A preset from configs/model/<name>.yaml, with keyword overrides."""
        path = PRESET_DIR / f"{name}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ValueError(f"unknown model preset {name!r}; known presets: {known}")
        values = yaml.safe_load(path.read_text()) or {}
        return cls.from_dict({**values, **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Strict constructor for user-written configs: unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**values)

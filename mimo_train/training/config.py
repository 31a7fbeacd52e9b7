"""The run configuration: one typed dataclass per concern, composed by Hydra from `recipes/`
(the recipe) and `configs/` (model, parallel, data, optim, checkpoint, logging groups).

`load_config(["recipe=pretrain", "parallel.tp=2", ...])` composes, then merges into these
dataclasses, so a wrong key or a value of the wrong type is one error line naming it before
any work starts; `RunConfig.validate` then checks the values themselves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mimo_train.data.dataset import DataConfig
from mimo_train.model.config import ModelConfig
from mimo_train.rl.config import RLConfig, RLConfigError, RolloutConfig

ROOT = Path(__file__).resolve().parents[2]
RECIPES, CONFIGS = ROOT / "recipes", ROOT / "configs"


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message says what to change."""


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved 1F1B)
    sequence_parallel: bool = False  # forced on for MoE models with tp > 1 (megatron needs it)
    distributed_optimizer: bool = True
    recompute: str | None = None  # null, "full" (whole layers) or "selective" (our core attention only)
    # How long a rank waits in a collective before the run is ended: long enough for rank 0's
    # rollouts and server start-ups while the others wait (torch's NCCL default is 10 minutes).
    timeout_minutes: int = 60

    def validate(self) -> None:
        for name in ("tp", "pp", "ep", "timeout_minutes"):
            _need(getattr(self, name) >= 1, f"parallel.{name} must be >= 1")
        _need(self.vpp is None or (self.vpp >= 2 and self.pp >= 2),
              "parallel.vpp (virtual stages per rank) needs parallel.pp >= 2 and vpp >= 2, or null")
        _need(self.recompute in (None, "full", "selective"), "parallel.recompute must be null, full or selective")


BACKENDS = ("megatron", "deepspeed")


@dataclass
class TrainerConfig:
    """Which engine trains the model (configs/trainer/): megatron-core on our MiMo model, or
    DeepSpeed ZeRO on any transformers causal LM (docs/deepspeed.md)."""

    backend: str = "megatron"
    # deepspeed: the student's serving directory (config.json, *.safetensors, tokenizer files);
    # its architecture is whatever transformers reads there (never remote code).
    model_dir: str | None = None
    zero_stage: int = 3  # 2: optimizer state and gradients sharded; 3: the parameters too
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU
    # Entries merged (deeply) into the DeepSpeed config the trainer writes, for DeepSpeed's own
    # knobs: +trainer.ds_config.zero_optimization.stage3_param_persistence_threshold=0
    ds_config: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        _need(self.backend in BACKENDS, f"trainer.backend={self.backend!r}: use one of {', '.join(BACKENDS)}")
        if self.backend == "deepspeed":
            _need(bool(self.model_dir), "trainer.backend=deepspeed needs trainer.model_dir: the serving directory of "
                  "the transformers model to train (config.json and *.safetensors)")
            _need(self.zero_stage in (2, 3), f"trainer.zero_stage={self.zero_stage}: use 2 or 3")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine, wsd (warmup-stable-decay) or constant
    wsd_decay_fraction: float = 0.2  # WSD: the last fraction of steps decays to min_lr

    def validate(self) -> None:
        _need(self.schedule in ("cosine", "wsd", "constant"), "optim.schedule must be cosine, wsd or constant")
        _need(self.lr > 0 and 0 <= self.min_lr <= self.lr, "optim: need lr > 0 and 0 <= min_lr <= lr")
        _need(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _need(0 < self.wsd_decay_fraction <= 1, "optim.wsd_decay_fraction must be in (0, 1]")


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch: int = 8  # packed samples per optimizer step, over all data-parallel ranks
    micro_batch: int = 1  # packed samples per forward on one rank
    seed: int = 1234
    mtp_weight: float = 0.3  # total = main + mtp_weight * mean over MTP depths
    expert_bias_update_rate: float = 1e-3
    max_skipped_steps: int = 5  # NaN/Inf steps tolerated (skipped) before the run stops
    bf16: bool | None = None  # null: bf16 on GPU, fp32 on CPU
    stop_at: int | None = None  # end this invocation (with a checkpoint) at this step; resume later

    def validate(self) -> None:
        _need(self.steps >= 1, "train.steps must be >= 1")
        _need(self.global_batch >= 1 and self.micro_batch >= 1, "train.global_batch and train.micro_batch must be >= 1")
        _need(self.mtp_weight >= 0, "train.mtp_weight must be >= 0")
        _need(self.max_skipped_steps >= 0, "train.max_skipped_steps must be >= 0")


@dataclass
class CheckpointConfig:
    dir: str | None = None  # default: <run_dir>/checkpoints
    every: int = 0  # save every N steps (0: only at the end)
    keep_last: int = 2
    resume: bool = True  # continue from <dir>/latest when it exists
    load: str | None = None  # start from another run's checkpoint (weights only)

    def validate(self) -> None:
        _need(self.every >= 0 and self.keep_last >= 1, "checkpoint: need every >= 0 and keep_last >= 1")


@dataclass
class LoggingConfig:
    run_dir: str = "runs/${recipe}"
    every: int = 1
    wandb_project: str = "mimo-train"
    wandb_mode: str = "offline"  # offline, online or disabled; WANDB_MODE in the environment wins
    progress: bool = True
    plot: bool = True

    def validate(self) -> None:
        _need(self.wandb_mode in ("offline", "online", "disabled"), "logging.wandb_mode must be offline, online or disabled")
        _need(self.every >= 1, "logging.every must be >= 1")


@dataclass
class RunConfig:
    recipe: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    rl: RLConfig = field(default_factory=RLConfig)  # recipes grpo and mopd
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # recipes grpo and mopd

    def validate(self) -> None:
        try:
            self.model.validate()
            self.data.validate()
            if self.recipe in ("grpo", "mopd"):
                self.rl.validate(self.recipe)
                self.rollout.validate()
                # Full recompute re-runs the routers in backward, after later micro-batches' forwards
                # (1F1B): they would replay another micro-batch's experts. Selective recompute re-runs
                # only the core attention (MiMoAttention), no router.
                _need(self.parallel.recompute != "full" or not any(self.model.moe_layer_freq),
                      "parallel.recompute=full is not supported with routing replay (RL recipes on MoE models): "
                      "use parallel.recompute=selective or null")
                depth, mtp = self.rl.spec_depth, self.model.num_nextn_predict_layers
                _need(depth != "auto" or self.rollout.backend == "native",
                      "rl.spec_depth=auto needs rollout.backend=native: a vLLM server's draft depth is fixed when "
                      "it starts; set rl.spec_depth to a number for rollout=vllm")
                _need(self.model.mtp_feed == "chained" or self.rollout.backend == "native" or depth == 0,
                      "model.mtp_feed=target_hidden drafts only with rollout.backend=native: vLLM chains the MTP "
                      "layers; set rl.spec_depth=0 to roll out on vLLM without drafts")
                _need(depth in (None, "auto") or depth <= mtp,
                      f"rl.spec_depth={depth} is more than the model's {mtp} MTP layers "
                      f"(model.num_nextn_predict_layers): set rl.spec_depth to 0..{mtp}, or null for all of them")
                need = self.rl.prompts_per_step * self.rl.group_size
                _need(self.train.global_batch == need,
                      f"train.global_batch={self.train.global_batch} must equal rl.prompts_per_step x rl.group_size "
                      f"= {need}: one optimizer step per batch of rollouts")
        except (ValueError, RLConfigError) as err:
            raise ConfigError(str(err)) from None
        for part in (self.trainer, self.parallel, self.optim, self.train, self.checkpoint, self.logging):
            part.validate()
        if self.trainer.backend == "deepspeed":
            self._validate_deepspeed()
        _need(self.optim.warmup_steps < self.train.steps,
              f"optim.warmup_steps={self.optim.warmup_steps} must be below train.steps={self.train.steps}")

    def _validate_deepspeed(self) -> None:
        """What only the megatron backend does is refused by name, with the setting to change."""
        p = self.parallel
        _need(p.tp == p.pp == p.ep == 1 and p.vpp is None,
              f"trainer.backend=deepspeed shards the model over data-parallel ranks (ZeRO) only: set parallel.tp, "
              f"parallel.pp and parallel.ep to 1 and parallel.vpp to null (got tp={p.tp} pp={p.pp} ep={p.ep} "
              f"vpp={p.vpp}), or use trainer=megatron")
        if self.recipe in ("grpo", "mopd"):
            _need(self.rollout.backend == "vllm",
                  "trainer.backend=deepspeed rolls out on vLLM: the native engine runs MiMo models only; add rollout=vllm")
            _need(not self.rl.routing_replay,
                  "rl.routing_replay replays megatron MoE routers (megatron backend only): set rl.routing_replay=false "
                  "with trainer.backend=deepspeed")
            _need(self.rl.spec_depth in (None, 0),
                  f"rl.spec_depth={self.rl.spec_depth} drafts with MiMo's MTP layers (megatron backend only): set "
                  "rl.spec_depth=0 with trainer.backend=deepspeed")

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def split_recipe(argv: list[str]) -> tuple[str, list[str]]:
    """`recipe=<name>` picks the file in recipes/; the rest are Hydra overrides."""
    recipes = [a for a in argv if a.startswith("recipe=")]
    _need(len(recipes) <= 1, "give recipe=<name> once")
    name = recipes[0].split("=", 1)[1] if recipes else "pretrain"
    known = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    _need(name in known, f"unknown recipe {name!r}; recipes in {RECIPES}: {known}")
    return name, [a for a in argv if not a.startswith("recipe=")]


def load_config(argv: list[str]) -> RunConfig:
    """Compose recipe + overrides with Hydra, type-check into RunConfig, validate."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from hydra.core.config_store import ConfigStore

    # Recipes list `run_schema` first in their defaults: every key exists, with its type,
    # before the recipe, the groups and the command line are merged onto it.
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    name, overrides = split_recipe(argv)
    try:
        with initialize_config_dir(config_dir=str(RECIPES), version_base=None):
            composed = compose(config_name=name, overrides=[f"hydra.searchpath=[file://{CONFIGS}]", *overrides])
        composed = OmegaConf.to_container(composed, resolve=True)
        composed.pop("hydra", None)
        typed = OmegaConf.merge(OmegaConf.structured(RunConfig), composed)
        config: RunConfig = OmegaConf.to_object(typed)
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"config error: {first}") from None
    except ValueError as err:  # a dataclass refusing its values while being built
        raise ConfigError(str(err).strip().splitlines()[0]) from None
    config.validate()
    if config.trainer.backend == "deepspeed":  # the sizes the loops read come from the student's config.json
        from mimo_train.training import hf_student

        hf_student.apply_facts(config.model, hf_student.read_config(config.trainer.model_dir))
    return config

"""Is a parallel layout possible for this model on this many ranks? Say what would be, if not.

Checked before any process group or model is built, so a wrong layout costs one error line,
not a hang inside a collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mimo_train.model.config import ModelConfig


class LayoutError(ValueError):
    pass


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def head_overrides(cfg: ModelConfig, tp: int) -> list[str]:
    """The smallest change to the head counts that tp divides, as model overrides: the fewest
    attention heads (the same for both layer kinds: o_proj is shared in shape), then for each
    kind the fewest kv heads that tp divides and that divide the heads."""
    def kv_for(heads: int, kv: int) -> int | None:
        return next((k for k in range(_round_up(kv, tp), heads + 1, tp) if heads % k == 0), None)

    for heads in range(_round_up(cfg.num_attention_heads, tp), cfg.num_attention_heads * tp * 4 + 1, tp):
        kv, swa_kv = kv_for(heads, cfg.num_key_value_heads), kv_for(heads, cfg.swa_num_key_value_heads)
        if kv and swa_kv:
            wanted = {"num_attention_heads": heads, "swa_num_attention_heads": heads,
                      "num_key_value_heads": kv, "swa_num_key_value_heads": swa_kv}
            return [f"model.{k}={v}" for k, v in wanted.items() if getattr(cfg, k) != v]
    return []


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    ep: int
    dp: int
    vpp: int | None


def check_layout(cfg: ModelConfig, world: int, tp: int, pp: int, ep: int, vpp: int | None,
                 global_batch: int, micro_batch: int) -> Layout:
    problems, fixes = [], []
    if world % (tp * pp):
        problems.append(f"world size {world} is not divisible by tp*pp = {tp * pp} "
                        f"(tp*pp must be one of {_divisors(world)})")
    dp = max(world // (tp * pp), 1)
    for kind in ("global", "swa"):
        dims = cfg.attention_dims(kind == "swa")
        for what, n in (("attention heads", dims["num_heads"]), ("kv heads", dims["num_kv_heads"])):
            if n % tp:
                problems.append(f"tp={tp} does not divide the {n} {kind} {what} "
                                f"(tp can be one of {_divisors(n)})")
    if problems and not fixes:
        fixes += head_overrides(cfg, tp)
    if any(cfg.moe_layer_freq):
        if cfg.n_routed_experts % ep:
            problems.append(f"ep={ep} does not divide the {cfg.n_routed_experts} experts "
                            f"(ep can be one of {_divisors(cfg.n_routed_experts)})")
            fixes.append(f"model.n_routed_experts={_round_up(cfg.n_routed_experts, math.lcm(ep, cfg.n_group))}")
        if world % pp or (world // pp) % ep:
            problems.append(f"ep={ep} must divide world/pp = {world}/{pp} (expert ranks come from tp x dp)")
    elif ep > 1:
        problems.append(f"ep={ep} but the model has no MoE layers: use ep=1")
    stages = pp * (vpp or 1)
    if cfg.num_hidden_layers % stages:
        problems.append(f"pp*vpp = {stages} does not divide the {cfg.num_hidden_layers} layers "
                        f"(pp*vpp can be one of {_divisors(cfg.num_hidden_layers)})")
        layers = _round_up(cfg.num_hidden_layers, stages)
        fixes.append(f"model.num_hidden_layers={layers} (with model.hybrid_layer_pattern and model.moe_layer_freq "
                     f"of {layers} entries)")
    if global_batch % (dp * micro_batch):
        problems.append(f"train.global_batch={global_batch} is not divisible by dp*micro_batch = "
                        f"{dp}*{micro_batch}")
    elif vpp and global_batch // (dp * micro_batch) != pp:
        # With more micro-batches than stages the interleaved run drifts from one process. Traced
        # so far (tiny model, pp=2 vpp=3, 4 micro-batches, world 2): the first pp micro-batches'
        # losses are bit-identical, the later ones' step-1 forward differs (3e-4 relative per
        # micro-batch, more at the MTP depths); a forward-only schedule is exact and no parameter
        # or buffer changes between the forwards, so the backward passes that 1F1B interleaves
        # before those forwards leave some other state behind. Refused until found.
        fit = (f"train.micro_batch={global_batch // (dp * pp)}" if global_batch % (dp * pp) == 0 else
               f"train.global_batch={dp * pp * micro_batch}")
        problems.append(f"interleaved pipeline (vpp={vpp}) is supported with exactly pp={pp} micro-batches per "
                        f"step (global_batch / (dp * micro_batch)), got {global_batch // (dp * micro_batch)}: with "
                        f"more, the later micro-batches' losses differ from a one-process run; set {fit}, or "
                        f"parallel.vpp=null")
    if problems:
        fix = f"; the model overrides that fit this layout: {' '.join(fixes)}" if fixes else ""
        raise LayoutError("unsupported parallel layout (tp={}, pp={}, ep={}, vpp={}, world {}): {}{}".format(
            tp, pp, ep, vpp, world, "; ".join(problems), fix))
    return Layout(tp=tp, pp=pp, ep=ep, dp=dp, vpp=vpp)

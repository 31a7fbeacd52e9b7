"""Static KV caches shaped for MiMo-V2-Flash: full caches for global layers, ring buffers for
SWA layers and MTP layers.

Every tensor is allocated once, with one row per engine slot, so a step never allocates cache
memory and the SWA / MTP caches do not grow with the sequence: a ring holds
`window + 1 + 2 * max_depth` entries (the window a query sees, plus room for the block a step
writes before it attends: K+1 verified tokens, or 2K positions of the MTP chain).

Positions, not slots, decide visibility: the attention kernel masks keys by position (k_pos < 0
is an empty slot). Global caches are indexed by position, so their key positions are just the
slot numbers. Ring slots hold position p at slot p % ring, with the position stored in a label
tensor shared by all layers of a kind (all write the same positions in one forward). Rolling
back rejected tokens is then one masked_fill of labels per kind, for every layer at once. Each
cache has one extra trash slot at the end: writes of padding positions (< 0) go there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimo_train.model.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, *, max_batch: int, max_len: int, max_depth: int, mtp_layers: int,
                 device: torch.device | str, dtype: torch.dtype):
        self.max_batch, self.max_len = max_batch, max_len
        self.window = cfg.sliding_window_size
        self.ring = self.window + 1 + 2 * max(max_depth, 1)
        # Zeros, not empty: masked keys still meet a zero weight in p @ v, and 0 * NaN = NaN.
        def kv(swa: bool, slots: int):
            d = cfg.attention_dims(swa)
            return (torch.zeros(max_batch, slots, d["num_kv_heads"], d["head_dim"], device=device, dtype=dtype),
                    torch.zeros(max_batch, slots, d["num_kv_heads"], d["v_head_dim"], device=device, dtype=dtype))

        self.layers = [kv(cfg.is_swa(i), self.ring + 1 if cfg.is_swa(i) else max_len + 1)
                       for i in range(cfg.num_hidden_layers)]
        self.mtp = [kv(True, self.ring + 1) for _ in range(mtp_layers)]
        self.ring_pos = torch.full((max_batch, self.ring + 1), -1, dtype=torch.long, device=device)
        self.mtp_pos = torch.full((max_batch, self.ring + 1), -1, dtype=torch.long, device=device)
        self.swa_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_swa(i)]

    # ---- write indices ----------------------------------------------------------------------
    def full_index(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.where(pos >= 0, pos, self.max_len)

    def ring_index(self, pos: torch.Tensor, first_kept: torch.Tensor | None = None) -> torch.Tensor:
        """Ring slot of each position; padding, and positions before first_kept [n, 1] (a
        prefill longer than the ring keeps its last `ring` positions), go to the trash slot."""
        keep = pos >= 0 if first_kept is None else pos >= first_kept.clamp(min=0)
        return torch.where(keep, pos % self.ring, self.ring)

    # ---- slot management --------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.layers + self.mtp for t in pair] + [self.ring_pos, self.mtp_pos]

    def move_row(self, src: int, dst: int) -> None:
        """Copy slot src into slot dst (compaction when a request finishes)."""
        for t in self.tensors():
            t[dst].copy_(t[src])

    def reset_rows(self, rows: slice) -> None:
        self.ring_pos[rows] = -1
        self.mtp_pos[rows] = -1

    def rollback(self, n: int, last_kept: torch.Tensor) -> None:
        """Forget ring entries of positions after last_kept [n] (rejected drafts), all SWA layers
        at once. Global caches need nothing: their keys are visible only up to the query's
        position, and the next step rewrites every slot from last_kept + 1 before reading it."""
        labels = self.ring_pos[:n]
        labels.masked_fill_(labels > last_kept[:, None], -1)

    def nbytes(self) -> dict[str, int]:
        size = lambda pairs: sum(t.numel() * t.element_size() for pair in pairs for t in pair)  # noqa: E731
        return {"global": size([p for i, p in enumerate(self.layers) if i not in self.swa_layers]),
                "swa": size([self.layers[i] for i in self.swa_layers]), "mtp": size(self.mtp)}


@dataclass
class Slots:
    """Where one forward over rows [0, n) (or a block of fresh rows) writes, and what it sees.

    q_pos [n, s] are the token positions (< 0: padding). `write[kind]` are the slot indices for
    kind "global", "swa" or "mtp"; `k_pos[kind]` the key positions the queries attend over
    (None in prefill mode, where fresh rows attend only to the block itself)."""

    rows: slice
    q_pos: torch.Tensor
    write: dict[str, torch.Tensor]
    k_pos: dict[str, torch.Tensor | None]
    bound: int  # global caches are read up to this slot
    prefill: bool
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]
    hidden: dict[str, torch.Tensor | None]  # per kind: `hidden_keys` of q_pos / k_pos (None in prefill)

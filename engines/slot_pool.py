"""Preallocated per-stream state, indexed by slot: the admission limit made physical.

Every tensor of per-stream state (encoder caches, the pre-encode mel cache, RNNT decoder state)
lives in one pool tensor with a slot dimension. A step gathers the batch's rows by index before
it runs and scatters them back after it succeeded, so a failed step changes nothing, and no
stream's state is ever concatenated or reallocated per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StateSpec:
    """One per-stream tensor: its shape without the slot dimension, where the slot dimension
    goes, and its dtype."""

    name: str
    shape: tuple[int, ...]
    slot_dim: int
    dtype: torch.dtype


class SlotPool:
    """Device tensors for every slot, and gather/scatter of a batch's rows."""

    def __init__(self, specs: list[StateSpec], capacity: int, device: torch.device):
        self.capacity = capacity
        self.specs = {s.name: s for s in specs}
        self.tensors: dict[str, torch.Tensor] = {}
        for s in specs:
            shape = list(s.shape)
            shape.insert(s.slot_dim, capacity)
            self.tensors[s.name] = torch.zeros(shape, dtype=s.dtype, device=device)

    def bytes_per_slot(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) // self.capacity

    def gather(self, index: torch.Tensor, fresh: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The batch's rows, in batch order. Rows where `fresh` is true (a stream's first chunk)
        come back zeroed, so a reused slot starts exactly like a new one without the pool being
        touched before the step succeeds."""
        out = {}
        fresh_rows = None if fresh is None else fresh.nonzero()[:, 0]
        for name, t in self.tensors.items():
            dim = self.specs[name].slot_dim
            rows = t.index_select(dim, index)
            if fresh_rows is not None:
                rows.index_fill_(dim, fresh_rows, 0)  # in place on the gathered copy: no second copy
            out[name] = rows
        return out

    def scatter(self, index: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        for name, v in values.items():
            t = self.tensors[name]
            t.index_copy_(self.specs[name].slot_dim, index, v.to(t.dtype))

"""Preallocated per-stream state, indexed by slot: the admission limit made physical.

Every tensor of per-stream state (encoder caches, the pre-encode mel cache, RNNT decoder state)
lives in one pool tensor with a slot dimension. A step gathers the batch's rows by index before
it runs and scatters them back after it succeeded, so a failed step changes nothing, and no
stream's state is ever concatenated or reallocated per step.

A state whose step only appends frames to a fixed window (the attention cache: the next cache is
the last C frames of [cache; new frames]) can be kept as a ring (`StateSpec.ring_shift`): the
gather reads each row's window in time order from its ring, and the commit writes only the new
frames over the oldest ones and advances the row's head. For the attention cache of a 160 ms
step that is 2 of 70 frames: the commit moves 1/35 of the bytes it moved as a whole window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engines.device_io import to_device
from engines.row_gather import gather_rows


@dataclass(frozen=True)
class StateSpec:
    """One per-stream tensor: its shape without the slot dimension, where the slot dimension
    goes, and its dtype."""

    name: str
    shape: tuple[int, ...]
    slot_dim: int
    dtype: torch.dtype
    # > 0: the dimension right after the slot dimension is a ring of frames, and a step appends
    # this many frames to it (the oldest drop out). 0: the state is written whole.
    ring_shift: int = 0


class SlotPool:
    """Device tensors for every slot, and gather/scatter of a batch's rows."""

    def __init__(self, specs: list[StateSpec], capacity: int, device: torch.device):
        self.capacity = capacity
        self.specs = {s.name: s for s in specs}
        self.tensors: dict[str, torch.Tensor] = {}
        # ring states: each slot's head, the ring position of its oldest frame
        self.heads: dict[str, torch.Tensor] = {}
        for s in specs:
            shape = list(s.shape)
            shape.insert(s.slot_dim, capacity)
            self.tensors[s.name] = torch.zeros(shape, dtype=s.dtype, device=device)
            if s.ring_shift:
                frames = shape[s.slot_dim + 1] if s.slot_dim + 1 < len(shape) else 0
                if not 0 < s.ring_shift <= frames:
                    raise ValueError(f"state {s.name}: a ring of {frames} frames cannot take {s.ring_shift} per step")
                self.heads[s.name] = torch.zeros(capacity, dtype=torch.int64, device=device)

    def bytes_per_slot(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) // self.capacity

    def gather(self, index: torch.Tensor, fresh: np.ndarray | None = None,
               into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The batch's rows, in batch order. Rows where `fresh` is true (a stream's first chunk)
        come back zeroed, so a reused slot starts exactly like a new one without the pool being
        touched before the step succeeds. `fresh` is a host bool array (its rows reach the
        device without a synchronization, which a device mask's nonzero() would cost).

        `into` names caller buffers (any strides, the rows' shape) to gather states straight
        into: one copy, where a gather then a copy into the buffer is two. A ring state gathered
        so keeps its ring order (rows as stored; their heads: `heads_of`); otherwise a ring's
        rows come in time order, the oldest frame first."""
        out = {}
        into = into or {}
        fresh_rows = None
        if fresh is not None and fresh.any():
            fresh_rows = to_device(np.flatnonzero(fresh), index.device)
        for name, t in self.tensors.items():
            dim = self.specs[name].slot_dim
            if name in into:
                rows = into[name]
                if dim != 1 or not gather_rows(t, index, rows):  # engines/row_gather.py: why
                    torch.index_select(t, dim, index, out=rows)
            elif name in self.heads:
                rows = self._gather_ring(name, t, dim, index)
            else:
                rows = t.index_select(dim, index)
            if fresh_rows is not None:
                rows.index_fill_(dim, fresh_rows, 0)  # in place on the gathered copy: no second copy
            out[name] = rows
        return out

    def scatter(self, index: torch.Tensor, values: dict[str, torch.Tensor], restart=None) -> None:
        """Writes the batch's next state. `restart` (host bool per row, optional) marks rows whose
        state the step began from zero (a stream's first chunk): their rings are written whole,
        since their old frames belong to the slot's previous stream."""
        for name, v in values.items():
            t = self.tensors[name]
            spec = self.specs[name]
            if name in self.heads:
                self._scatter_ring(name, t, spec, index, v.to(t.dtype), restart)
            else:
                t.index_copy_(spec.slot_dim, index, v.to(t.dtype))

    # -- rings --------------------------------------------------------------------------------
    def heads_of(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Each row's ring head (the position of its oldest frame), for rows gathered as stored."""
        return self.heads[name].index_select(0, index)

    @staticmethod
    def _ring_positions(slots: torch.Tensor, head: torch.Tensor, C: int, frames: int) -> torch.Tensor:
        """Flat positions (slot * C + ring index) of each row's first `frames` frames from its
        head, in time order: [rows * frames]."""
        steps = torch.arange(frames, device=slots.device)
        return (slots[:, None] * C + (head[:, None] + steps[None, :]) % C).reshape(-1)

    def _gather_ring(self, name: str, t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
        C = t.shape[dim + 1]
        flat = t.flatten(dim, dim + 1)
        positions = self._ring_positions(index, self.heads_of(name, index), C, C)
        return flat.index_select(dim, positions).unflatten(dim, (index.numel(), C))

    def _scatter_ring(self, name: str, t: torch.Tensor, spec: StateSpec, index: torch.Tensor, v: torch.Tensor,
                      restart) -> None:
        dim, shift = spec.slot_dim, spec.ring_shift
        C = t.shape[dim + 1]
        heads = self.heads[name]
        new = v.narrow(dim + 1, C - shift, shift)  # the new frames: the window's last `shift`
        if restart is not None and bool(np.any(restart)):
            # host masks -> device row lists (no device sync)
            whole = to_device(np.flatnonzero(restart), index.device)
            steady = to_device(np.flatnonzero(~np.asarray(restart)), index.device)
            t.index_copy_(dim, index.index_select(0, whole), v.index_select(dim, whole))
            heads.index_fill_(0, index.index_select(0, whole), 0)
            if not steady.numel():
                return
            index, new = index.index_select(0, steady), new.index_select(dim, steady)
        # they overwrite each ring's oldest frames
        head = heads.index_select(0, index)
        t.flatten(dim, dim + 1).index_copy_(dim, self._ring_positions(index, head, C, shift), new.flatten(dim, dim + 1))
        heads.index_copy_(0, index, (head + shift) % C)

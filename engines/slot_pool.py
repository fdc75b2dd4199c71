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

from dataclasses import dataclass, field

import numpy as np
import torch

from engines.device_io import to_device
from engines.row_gather import gather_rows, scatter_rows


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
               into: dict[str, torch.Tensor] | None = None, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """The batch's rows, in batch order. Rows where `fresh` is true (a stream's first chunk)
        come back zeroed, so a reused slot starts exactly like a new one without the pool being
        touched before the step succeeds. `fresh` is a host bool array (its rows reach the
        device without a synchronization, which a device mask's nonzero() would cost).

        `into` names caller buffers (any strides, the rows' shape) to gather states straight
        into: one copy, where a gather then a copy into the buffer is two. A ring state gathered
        so keeps its ring order (rows as stored; their heads: `heads_of`); otherwise a ring's
        rows come in time order, the oldest frame first. States named in `skip` are not
        gathered (an engine that reads them in the pool itself)."""
        out = {}
        into = into or {}
        fresh_rows = None
        if fresh is not None and fresh.any():
            fresh_rows = to_device(np.flatnonzero(fresh), index.device)
        for name, t in self.tensors.items():
            if name in skip:
                continue
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

    def stage(self, values: dict[str, torch.Tensor], restart=None) -> "StagedState":
        """What `commit` will write, copied out of `values` (the batch's next state) now: the new
        frames of each ring row, every other state whole, in the pool's dtypes. A ring's value
        is the window's last C frames, or fewer (the new frames alone: an encoder that reads
        the ring in place keeps no window). `restart` (host
        bool per row, optional) marks rows whose state the step began from zero (a stream's
        first chunk): their rings are written whole, since their old frames belong to the slot's
        previous stream.
        Why a copy: a CUDA-graph encoder's outputs are its static buffers, which the next step's
        encoder overwrites as soon as it is queued; staged, a step's state no longer depends on
        them, and its commit can follow its decode while the next step's encoder runs. Nothing
        of the pool is written here (compute, then commit)."""
        restart_rows = steady_rows = None
        if restart is not None and bool(np.any(restart)):
            restart = np.asarray(restart, dtype=bool)
            restart_rows, steady_rows = np.flatnonzero(restart), np.flatnonzero(~restart)
        staged = StagedState(restart_rows=restart_rows, steady_rows=steady_rows)
        for name, v in values.items():
            t = self.tensors[name]
            spec = self.specs[name]
            if name not in self.heads:
                staged.whole[name] = v.to(t.dtype, copy=True)
                continue
            dim, shift = spec.slot_dim, spec.ring_shift
            C = t.shape[dim + 1]
            frames = v.shape[dim + 1]  # the window's last C frames, or (at least) the new ones alone
            if not shift <= frames <= C:
                raise ValueError(f"state {name}: {frames} frames a row, neither the ring's {C} nor its {shift} new")
            new = v.narrow(dim + 1, frames - shift, shift)  # the new frames: the value's last `shift`
            if restart_rows is not None:
                whole = to_device(restart_rows, v.device)
                rows = v.index_select(dim, whole).to(t.dtype)
                if frames < C:  # a restarted row's older frames are empty: zeros before the new ones
                    rows = torch.cat([rows.new_zeros(rows.shape[:dim + 1] + (C - frames,) + rows.shape[dim + 2:]), rows],
                                     dim + 1)
                staged.ring_whole[name] = rows
                new = new.index_select(dim, to_device(steady_rows, v.device))
            out = torch.empty(new.shape, dtype=t.dtype, device=t.device)
            out.copy_(new)  # always a copy: a view here would still read the encoder's buffer
            staged.ring_new[name] = out.flatten(dim, dim + 1)
        return staged

    def commit(self, index: torch.Tensor, staged: "StagedState", values: dict[str, torch.Tensor] | None = None) -> None:
        """Writes a staged state (`stage`), and `values`, states written whole that the caller
        owns (no copy), into the batch's slots."""
        for name, v in {**staged.whole, **(values or {})}.items():
            t = self.tensors[name]
            self._write_rows(t, self.specs[name].slot_dim, index, v.to(t.dtype))
        for name, new in staged.ring_new.items():
            self._commit_ring(name, index, staged, new)

    # -- rings --------------------------------------------------------------------------------
    def _commit_ring(self, name: str, index: torch.Tensor, staged: "StagedState", new: torch.Tensor) -> None:
        t = self.tensors[name]
        dim, shift = self.specs[name].slot_dim, self.specs[name].ring_shift
        C = t.shape[dim + 1]
        heads = self.heads[name]
        if staged.restart_rows is not None:
            # host row lists -> device (no device sync)
            whole = index.index_select(0, to_device(staged.restart_rows, index.device))
            self._write_rows(t, dim, whole, staged.ring_whole[name])
            heads.index_fill_(0, whole, 0)
            if not len(staged.steady_rows):
                return
            index = index.index_select(0, to_device(staged.steady_rows, index.device))
        # they overwrite each ring's oldest frames
        head = heads.index_select(0, index)
        self._write_rows(t.flatten(dim, dim + 1), dim, self._ring_positions(index, head, C, shift), new)
        heads.index_copy_(0, index, (head + shift) % C)

    @staticmethod
    def _write_rows(t: torch.Tensor, dim: int, index: torch.Tensor, rows: torch.Tensor) -> None:
        """t's rows `index` along `dim` = rows: a block copy where the slot dimension is not the
        first (engines/row_gather.py: index_copy_ takes a generic path there), else index_copy_."""
        if dim != 1 or not scatter_rows(rows, index, t):
            t.index_copy_(dim, index, rows)

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


@dataclass
class StagedState:
    """A step's next state, copied out of the tensors it was computed in (SlotPool.stage), ready
    for SlotPool.commit. Tensors hold rows in batch order."""

    restart_rows: np.ndarray | None = None  # batch rows whose rings are written whole (None: none)
    steady_rows: np.ndarray | None = None   # the other rows, whose rings append (with restart_rows)
    whole: dict[str, torch.Tensor] = field(default_factory=dict)      # states written whole
    ring_new: dict[str, torch.Tensor] = field(default_factory=dict)   # ring states: the appending rows' new frames, frames flattened into the row dim
    ring_whole: dict[str, torch.Tensor] = field(default_factory=dict)  # ring states: the restart rows' whole windows

    def tensors(self) -> list[torch.Tensor]:
        return [*self.whole.values(), *self.ring_new.values(), *self.ring_whole.values()]

"""Endpointing on the device: where each stream's utterances start and end, for the whole batch
at once, from the model's own per-frame output.

Each encoder frame of a step carries the frame's non-blank probability (1 - P(blank) at its
first joint evaluation, from the decode loop) and, for models with an end-of-utterance token,
whether the model emitted it there. Riva's EndpointingConfig rules act on windows of those
probabilities (engines.api.EndpointingParams). Per slot the engine keeps the last
`history_frames` probabilities and two flags (in an utterance; end-of-utterance token seen),
in the slot pool beside the caches, so a failed step changes none of it.

A step's window sums come from one cumulative sum over [history | new frames] for every row
and frame; only the two flags run frame by frame, over the step's few frames (2 at 160 ms),
as whole-batch tensor operations. Nothing here loops over streams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from engines.api import MAX_ENDPOINT_HISTORY_MS, EndpointingParams
from engines.device_io import to_device

# Columns of the per-slot parameter table.
# (the three windows' lengths side by side, then their thresholds: each group is one slice)
_ENABLED, _START_N, _STOP_N, _EOU_N, _START_T, _STOP_T, _EOU_T = range(7)
_WINDOW_N = slice(_START_N, _EOU_N + 1)
_WINDOW_T = slice(_START_T, _EOU_T + 1)


@dataclass(frozen=True)
class EndpointEvents:
    """[B, T] on the device: speech started / an utterance ended at this frame of the step."""

    starts: torch.Tensor
    ends: torch.Tensor


class Endpointer:
    """Per-slot endpointing parameters (host table, copied per step for the batch's rows) and
    the step's computation. The per-slot state itself lives in the engine's slot pool
    (`state_shapes`)."""

    def __init__(self, capacity: int, frame_ms: float, device: torch.device):
        self.frame_ms = frame_ms
        self.device = device
        self.history_frames = max(1, math.ceil(MAX_ENDPOINT_HISTORY_MS / frame_ms))
        self.params = np.zeros((capacity, 7), dtype=np.float32)  # row of a slot; _ENABLED 0: off
        self._frame_index: dict[int, torch.Tensor] = {}

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], int]]:
        """name -> (shape without the slot dim, slot dim), for the slot pool (float32)."""
        return {"ep_hist": ((self.history_frames,), 0), "ep_flags": ((2,), 0)}

    def frames(self, ms: int) -> int:
        """A window in frames: at least one frame for any positive history."""
        return 0 if ms <= 0 else min(self.history_frames, max(1, round(ms / self.frame_ms)))

    def configure(self, slot: int, params: EndpointingParams | None) -> None:
        """A stream's first chunk sets its slot's row (None: endpointing off)."""
        if params is None:
            self.params[slot] = 0.0
            return
        self.params[slot] = (1.0, self.frames(params.start_history_ms), self.frames(params.stop_history_ms),
                             self.frames(params.stop_history_eou_ms), params.start_threshold,
                             params.stop_threshold, params.stop_threshold_eou)

    def enabled(self, slots: np.ndarray) -> bool:
        return bool(self.params[slots, _ENABLED].any())

    @torch.inference_mode()
    def step(self, slots: np.ndarray, nonblank: torch.Tensor, eou: torch.Tensor | None, valid: torch.Tensor,
             reset: torch.Tensor | None, hist: torch.Tensor, flags: torch.Tensor
             ) -> tuple[EndpointEvents, torch.Tensor, torch.Tensor]:
        """nonblank [B, T] (float), eou [B, T] (bool) or None, valid [B] frames of this step per
        row, reset [B] (bool: start afresh) or None; hist [B, W] and flags [B, 2] the rows'
        state. Returns the events and the rows' new hist and flags (to commit)."""
        B, T = nonblank.shape
        W = hist.shape[1]
        dev = self.device
        # One host-to-device copy of the batch's parameter rows; every op below is batched, and
        # there are few of them (the step's cost is their launches, not their arithmetic).
        p = to_device(self.params[slots], dev)
        if reset is not None:
            keep = (~reset)[:, None].to(hist.dtype)
            hist = hist * keep
            flags = flags * keep
        frame = self._frames(T)
        in_step = frame[None, :] < valid[:, None]                      # [B, T]
        ext = torch.cat([hist.float(), nonblank.float() * in_step], dim=1)   # [B, W + T]
        cs = torch.nn.functional.pad(ext.cumsum(1), (1, 0))             # cs[:, i] = sum of ext[:, :i]
        # The three windows (start, stop, end-of-utterance) at once: the window of n frames
        # ending at step frame j is cs[W + 1 + j] - cs[W + 1 + j - n].
        n = p[:, _WINDOW_N].long()                                      # [B, 3]
        lo = (W + 1 + frame)[None, None, :] - n[:, :, None]             # [B, 3, T]
        total = cs[:, None, W + 1:W + 1 + T] - cs.gather(1, lo.clamp(min=0).view(B, 3 * T)).view(B, 3, T)
        nf = n.to(total.dtype)[:, :, None]
        need = p[:, _WINDOW_T, None] * nf                               # threshold x frames
        none = nf == 0
        speech = total >= need                                          # non-blank mass reaches it
        silence = (nf - total) >= need                                  # blank mass reaches it
        start_ok = none[:, 0] | speech[:, 0]
        stop_ok = ~none[:, 1] & silence[:, 1]
        eou_ok = none[:, 2] | silence[:, 2]
        live = in_step & (p[:, _ENABLED] > 0)[:, None]
        may_start = live & start_ok
        may_stop = live & stop_ok
        may_stop_eou = live & eou_ok
        eou_live = eou & live if eou is not None else None

        active = flags[:, 0] > 0
        pending = flags[:, 1] > 0
        starts, ends = [], []
        for j in range(T):  # the flags carry from frame to frame: only this runs per frame
            began = may_start[:, j] & ~active
            active = active | began
            if eou_live is not None:
                pending = pending | (active & eou_live[:, j])
            ended = active & ~began & (may_stop[:, j] | (pending & may_stop_eou[:, j]))
            active = active & ~ended
            pending = pending & ~ended
            starts.append(began)
            ends.append(ended)
        new_hist = ext[:, T:]  # the last W frames
        new_flags = torch.stack([active, pending], dim=1).to(flags.dtype)
        return EndpointEvents(torch.stack(starts, 1), torch.stack(ends, 1)), new_hist, new_flags

    def _frames(self, T: int) -> torch.Tensor:
        got = self._frame_index.get(T)
        if got is None:
            got = self._frame_index[T] = torch.arange(T, device=self.device)
        return got


def event_frames(events: EndpointEvents, base: np.ndarray) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[int, ...]]]:
    """The events as stream frames (base + frame of the step) by batch row, for the rows that
    have any: one device-to-host copy and numpy, no loop over rows without events."""
    both = torch.stack([events.starts, events.ends]).cpu().numpy()  # [2, B, T]
    out: list[dict[int, tuple[int, ...]]] = []
    for kind in both:
        rows, cols = np.nonzero(kind)
        found: dict[int, list[int]] = {}
        for r, c in zip(rows.tolist(), cols.tolist()):
            found.setdefault(r, []).append(int(base[r]) + c)
        out.append({r: tuple(v) for r, v in found.items()})
    return out[0], out[1]

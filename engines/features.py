"""Streaming log-mel features, computed for a whole batch at once on the engine's device.

Each step's STFT runs over one fixed-size waveform window per stream, so a batch is one
tensor and every step has one shape. The window of chunk k starts one sample before the
first sample frame k*C reads (that sample feeds pre-emphasis) and ends where frame (k+1)*C-1
stops reading. Samples the window needs from before the chunk's own span are the stream's
history, kept on the host per slot (they arrived with earlier chunks).

The arithmetic mirrors NeMo's FilterbankFeatures (pre-emphasis, STFT with the model's window,
power spectrum, mel filterbank, log with the zero guard, frames past the end set to the pad
value), so a stream's frames equal NeMo's preprocessor run over the whole file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engines.api import RowSamples
from engines.cudagraph_engine import bucket_for, capture_per_bucket
from engines.device_io import copy_into, to_device
from engines.geometry import ChunkGeometry


@dataclass(frozen=True)
class _Rows:
    """A batch's rows as arrays: slot, first chunk, new samples with the lead-in (framed), framed
    samples seen before the chunk, and the absolute start of each row's window."""

    slot: np.ndarray
    first: np.ndarray
    framed: np.ndarray
    seen: np.ndarray
    starts: np.ndarray


@dataclass(frozen=True)
class FeatureBatch:
    new_frames: torch.Tensor    # [B, n_mels, C] float32 on device
    valid_frames: torch.Tensor  # [B] int64: frames of this chunk inside the stream
    valid_frames_host: np.ndarray


class StreamingFeaturizer:
    """Owns the featurizer constants and each slot's waveform history."""

    def __init__(self, featurizer, geometry: ChunkGeometry, capacity: int, device: torch.device):
        if getattr(featurizer, "frame_splicing", 1) != 1:
            raise ValueError("frame splicing is not supported in streaming")
        self.geometry = geometry
        self.device = device
        self.preemph = featurizer.preemph
        self.window = featurizer.window.detach().to(device=device, dtype=torch.float32)
        self.fb = featurizer.fb.detach().to(device=device, dtype=torch.float32)  # [1, n_mels, n_fft//2+1]
        self.mag_power = featurizer.mag_power
        self.log = featurizer.log
        self.guard_type = featurizer.log_zero_guard_type
        self.guard_value = featurizer.log_zero_guard_value_fn(torch.zeros((), dtype=torch.float32))
        self.pad_value = featurizer.pad_value
        self.n_mels = self.fb.shape[1]
        g = geometry
        if g.right_context < 0:
            raise ValueError("models whose STFT reads less than one hop past a frame are not supported")
        self.window_len = 1 + g.stft_left_pad + g.chunk_samples + g.right_context
        self.history_len = 1 + g.stft_left_pad + g.right_context
        self.history = np.zeros((capacity, self.history_len), dtype=np.float32)
        self.samples_seen = np.zeros(capacity, dtype=np.int64)
        self.graphs: FeatureGraphs | None = None  # set by the engine on a GPU (FeatureGraphs)

    def _framed(self, new: np.ndarray, first: bool) -> np.ndarray:
        lead = self.geometry.lead_in
        return np.concatenate([np.zeros(lead, np.float32), new]) if first and lead else new

    def _rows(self, slots: list[int], chunk_index: list[int], samples: list[np.ndarray],
              fresh: list[bool]) -> "_Rows":
        """Per-row positions of a batch, as arrays (no state changed)."""
        g = self.geometry
        slot = np.asarray(slots, dtype=np.int64)
        first = np.asarray(fresh, dtype=bool)
        lens = samples.lengths if isinstance(samples, RowSamples) else \
            np.fromiter((len(x) for x in samples), dtype=np.int64, count=len(samples))
        framed = lens + np.where(first, g.lead_in, 0)   # a first chunk is framed behind the lead-in
        seen = np.where(first, 0, self.samples_seen[slot])
        starts = np.asarray(chunk_index, dtype=np.int64) * g.chunk_samples - g.stft_left_pad - 1
        return _Rows(slot, first, framed, seen, starts)

    def _stack(self, samples, rows: np.ndarray | None) -> np.ndarray:
        """The named rows' samples (None: all; whole chunks each) as one array: from a flat
        buffer without a view per row."""
        if isinstance(samples, RowSamples):
            return samples.stack(np.arange(len(samples)) if rows is None else rows, self.window_len - self.history_len)
        return np.stack(samples if rows is None else [samples[i] for i in rows.tolist()])

    def assemble(self, slots: list[int], chunk_index: list[int], samples: list[np.ndarray],
                 ended: list[bool], fresh: list[bool],
                 out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Host side: the batch's waveform windows, each row's absolute end of audio in framed
        samples (lead-in included; -1 while
        the stream is open) and each window's absolute start. Changes no state; a fresh row
        (a stream's first chunk) reads silence as its history, whatever its slot held before.

        Steady-state rows (not first, not last, a whole chunk, the window meeting a full
        history) are copied in two bulk numpy operations; only the others go row by row.
        `out` ([rows, window_len] float32): where to write the windows (the engine's pinned host
        buffer, which the copy to the device then reads as it is); else a new array."""
        B = len(slots)
        r = self._rows(slots, chunk_index, samples, fresh)
        done = np.asarray(ended, dtype=bool)
        take = r.seen - r.starts  # the window begins with this many already-seen samples
        steady = ~r.first & ~done & (take == self.history_len) & (r.framed == self.window_len - self.history_len)
        audio_end = np.where(done, r.seen + r.framed, -1)
        if out is not None and out.shape != (B, self.window_len):
            raise ValueError(f"windows of {B} rows x {self.window_len} samples do not fit {out.shape}")
        windows = np.empty((B, self.window_len), dtype=np.float32) if out is None else out
        if steady.all():
            windows[:, :self.history_len] = self.history[r.slot]
            if isinstance(samples, RowSamples):  # straight into the windows (a ring's spans: one pass)
                samples.stack_into(windows[:, self.history_len:])
            else:
                windows[:, self.history_len:] = self._stack(samples, None) if B else 0.0
            return windows, audio_end, r.starts
        rows = np.flatnonzero(steady)
        windows[~steady] = 0.0  # the others' silence: history before a stream, past a last chunk
        if len(rows):
            windows[rows, :self.history_len] = self.history[r.slot[rows]]
            windows[rows, self.history_len:] = self._stack(samples, rows)
        for i in np.flatnonzero(~steady).tolist():
            slot, k, first, t = int(r.slot[i]), chunk_index[i], bool(r.first[i]), int(take[i])
            new = self._framed(samples[i], first)
            if not 0 < t <= self.history_len:
                raise AssertionError(f"slot {slot}: chunk {k} window does not meet its history")
            if not first:
                windows[i, :t] = self.history[slot, self.history_len - t:]
            room = self.window_len - t
            if len(new) > room:
                raise ValueError(f"chunk {k} has {len(new)} samples; at most {room} fit")
            windows[i, t:t + len(new)] = new
            if not done[i] and len(new) != room:
                raise ValueError(f"chunk {k} has {len(new)} samples; {room} are needed while audio continues")
        return windows, audio_end, r.starts

    def commit(self, slots: list[int], samples: list[np.ndarray], windows: np.ndarray,
               starts: np.ndarray, fresh: list[bool]) -> None:
        """After a successful step: each slot keeps the history_len samples before its next chunk."""
        r = self._rows(slots, [0] * len(slots), samples, fresh)
        seen = r.seen + r.framed
        end_rel = seen - starts
        whole = end_rel == self.window_len  # the window ends where the stream does: one bulk copy
        if whole.all():
            self.history[r.slot] = windows[:, self.window_len - self.history_len:]
        else:
            rows = np.flatnonzero(whole)
            self.history[r.slot[rows]] = windows[rows, self.window_len - self.history_len:]
            for i in np.flatnonzero(~whole).tolist():
                slot, e = int(r.slot[i]), int(end_rel[i])
                lo = e - self.history_len
                if lo >= 0:
                    self.history[slot] = windows[i, lo:e]
                else:  # a very short stream: what lies before the window is silence
                    self.history[slot, :-lo] = 0.0
                    self.history[slot, -lo:] = windows[i, :e]
        self.samples_seen[r.slot] = seen

    @torch.inference_mode()
    def compute(self, windows: np.ndarray, audio_end: np.ndarray, starts: np.ndarray,
                chunk_index: list[int], host: torch.Tensor | None = None) -> FeatureBatch:
        """The batch's log-mel features on the device. `host`: the tensor `windows` is a view of
        (engines.device_io.host_buffer), copied to the device as it is (no second host copy)."""
        g = self.geometry
        B = windows.shape[0]
        end = np.where(audio_end < 0, np.iinfo(np.int64).max, audio_end)
        # frames past the end of a finished stream are padding, as in NeMo's preprocessor
        C = g.chunk_frames
        valid = np.full(B, C, dtype=np.int64)
        done = audio_end >= 0
        if done.any():
            frames = g.stft_frames_many(audio_end[done])
            valid[done] = np.minimum(C, frames - np.asarray(chunk_index, dtype=np.int64)[done] * C)
        graphs = self.graphs
        source = windows if host is None else host
        if graphs is not None and B <= graphs.max_batch:
            mel, valid_t = graphs.run(source, starts, end, valid)
        else:
            dev = self.device
            valid_t = to_device(valid, dev)
            mel = self.mel(to_device(source, dev), to_device(starts, dev), to_device(end, dev), valid_t)
        return FeatureBatch(new_frames=mel, valid_frames=valid_t, valid_frames_host=valid)

    def mel(self, x: torch.Tensor, starts: torch.Tensor, end: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The device part: windows [B, W] float32, each window's absolute first sample, the
        stream's end in framed samples (int64 max while open) and the chunk's frames inside
        the stream -> log-mel [B, n_mels, C]. Only tensor operations of fixed shapes: the
        feature graphs capture it as it is."""
        g = self.geometry
        dev = x.device
        W = x.shape[1]
        pos = starts[:, None] + torch.arange(1, W, device=dev)[None, :]
        if self.preemph:
            y = x[:, 1:] - self.preemph * x[:, :-1]
        else:
            y = x[:, 1:].clone()
        y = y.masked_fill((pos < 0) | (pos >= end[:, None]), 0.0)
        spec = torch.stft(y, n_fft=g.n_fft, hop_length=g.hop, win_length=self.window.shape[0],
                          window=self.window, center=False, return_complex=True)
        mag = torch.view_as_real(spec).pow(2).sum(-1).sqrt()
        if self.mag_power != 1.0:
            mag = mag.pow(self.mag_power)
        mel = torch.matmul(self.fb, mag)
        if self.log:
            if self.guard_type == "add":
                mel = torch.log(mel + self.guard_value)
            else:
                mel = torch.log(torch.clamp(mel, min=self.guard_value))
        frame_mask = torch.arange(g.chunk_frames, device=dev)[None, :] >= valid[:, None]
        return mel.masked_fill(frame_mask[:, None, :], self.pad_value)


class FeatureGraphs:
    """`StreamingFeaturizer.mel` captured into one CUDA graph per batch bucket, replayed on
    static input buffers: a step's features are one graph launch instead of about twenty
    kernels queued one by one from Python, the host's work between two device runs of the
    engine worker's overlap (server/runtime/engine_worker.py). A batch of n rows runs in the
    smallest bucket >= n; rows past n hold whatever an earlier step left there (finite audio:
    a bad chunk never reaches the features), and their outputs are not read. Outputs are views
    into the graph's memory, valid until the next step's features: a step's device work that
    reads them is queued before the next step's (the worker queues a step's device work only
    once the step before it is on the device). `use_graphs=False` runs the same buffers
    without capturing (tests on CPU)."""

    def __init__(self, featurizer: StreamingFeaturizer, buckets: tuple[int, ...], use_graphs: bool = True):
        self.featurizer = featurizer
        self.buckets = tuple(sorted(set(buckets)))
        self.max_batch = self.buckets[-1]
        dev = featurizer.device
        if use_graphs and dev.type != "cuda":
            raise RuntimeError(f"feature graphs need a CUDA device, not {dev}")
        n, C = self.max_batch, featurizer.geometry.chunk_frames
        self.x = torch.zeros(n, featurizer.window_len, dtype=torch.float32, device=dev)
        self.starts = torch.zeros(n, dtype=torch.int64, device=dev)
        self.end = torch.full((n,), np.iinfo(np.int64).max, dtype=torch.int64, device=dev)
        self.valid = torch.full((n,), C, dtype=torch.int64, device=dev)
        self.use_graphs = use_graphs
        self.captures = 0
        self.runs = 0
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        if use_graphs:
            self._capture()

    def _call(self, b: int) -> torch.Tensor:
        return self.featurizer.mel(self.x[:b], self.starts[:b], self.end[:b], self.valid[:b])

    @torch.inference_mode()
    def _capture(self) -> None:
        # two runs first: cuFFT plans and the allocator settle before the capture
        for b, (graph, out) in capture_per_bucket(self.featurizer.device, self.buckets, self._call, 2).items():
            self._graphs[b] = graph
            self._outputs[b] = out
            self.captures += 1

    @torch.inference_mode()
    def run(self, windows: np.ndarray | torch.Tensor, starts: np.ndarray, end: np.ndarray,
            valid: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-mel [n, n_mels, C], valid frames [n] on the device) of a batch of n rows; the
        windows as an array or a host tensor (engines.device_io.copy_into)."""
        n = windows.shape[0]
        b = bucket_for(n, self.buckets)
        copy_into(self.x[:n], windows)
        copy_into(self.starts[:n], starts)
        copy_into(self.end[:n], end)
        copy_into(self.valid[:n], valid)
        if self.use_graphs:
            self._graphs[b].replay()
            out = self._outputs[b]
        else:  # into a buffer kept per bucket, as the graph's output is: the same aliasing on the CPU
            fresh = self._call(b)
            out = self._outputs.get(b)
            if out is None or out.shape != fresh.shape:
                out = self._outputs[b] = torch.empty_like(fresh)
            out.copy_(fresh)
        self.runs += 1
        return out[:n], self.valid[:n]

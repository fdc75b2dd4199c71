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

from engines.geometry import ChunkGeometry


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

    def _seen(self, slot: int, fresh: bool) -> int:
        """Samples of the slot's framed stream (lead-in included) before this chunk."""
        return 0 if fresh else int(self.samples_seen[slot])

    def _framed(self, new: np.ndarray, first: bool) -> np.ndarray:
        lead = self.geometry.lead_in
        return np.concatenate([np.zeros(lead, np.float32), new]) if first and lead else new

    def assemble(self, slots: list[int], chunk_index: list[int], samples: list[np.ndarray],
                 ended: list[bool], fresh: list[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Host side: the batch's waveform windows, each row's absolute end of audio in framed
        samples (lead-in included; -1 while
        the stream is open) and each window's absolute start. Changes no state; a fresh row
        (a stream's first chunk) reads silence as its history, whatever its slot held before."""
        g = self.geometry
        B = len(slots)
        windows = np.zeros((B, self.window_len), dtype=np.float32)
        audio_end = np.full(B, -1, dtype=np.int64)
        starts = np.zeros(B, dtype=np.int64)
        for i, (slot, k, new, done, first) in enumerate(zip(slots, chunk_index, samples, ended, fresh)):
            seen = self._seen(slot, first)
            new = self._framed(new, first)
            start = k * g.chunk_samples - g.stft_left_pad - 1  # absolute index of windows[i, 0]
            starts[i] = start
            take = seen - start  # the window begins with this many already-seen samples
            if not 0 < take <= self.history_len:
                raise AssertionError(f"slot {slot}: chunk {k} window does not meet its history")
            if not first:
                windows[i, :take] = self.history[slot, self.history_len - take:]
            room = self.window_len - take
            if len(new) > room:
                raise ValueError(f"chunk {k} has {len(new)} samples; at most {room} fit")
            windows[i, take:take + len(new)] = new
            if done:
                audio_end[i] = seen + len(new)
            elif len(new) != room:
                raise ValueError(f"chunk {k} has {len(new)} samples; {room} are needed while audio continues")
        return windows, audio_end, starts

    def commit(self, slots: list[int], samples: list[np.ndarray], windows: np.ndarray,
               starts: np.ndarray, fresh: list[bool]) -> None:
        """After a successful step: each slot keeps the history_len samples before its next chunk."""
        for i, (slot, new, first) in enumerate(zip(slots, samples, fresh)):
            seen = self._seen(slot, first) + len(self._framed(new, first))
            end_rel = seen - int(starts[i])
            lo = end_rel - self.history_len
            if lo >= 0:
                self.history[slot] = windows[i, lo:end_rel]
            else:  # a very short stream: what lies before the window is silence
                self.history[slot, :-lo] = 0.0
                self.history[slot, -lo:] = windows[i, :end_rel]
            self.samples_seen[slot] = seen

    @torch.inference_mode()
    def compute(self, windows: np.ndarray, audio_end: np.ndarray, starts: np.ndarray,
                chunk_index: list[int]) -> FeatureBatch:
        g = self.geometry
        dev = self.device
        x = torch.from_numpy(windows).to(dev, non_blocking=True)
        B, W = x.shape
        pos = torch.from_numpy(starts).to(dev)[:, None] + torch.arange(1, W, device=dev)[None, :]
        if self.preemph:
            y = x[:, 1:] - self.preemph * x[:, :-1]
        else:
            y = x[:, 1:].clone()
        end = torch.from_numpy(np.where(audio_end < 0, np.iinfo(np.int64).max, audio_end)).to(dev)
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
        # frames past the end of a finished stream are padding, as in NeMo's preprocessor
        C = g.chunk_frames
        valid = np.full(B, C, dtype=np.int64)
        for i, k in enumerate(chunk_index):
            if audio_end[i] >= 0:
                valid[i] = min(C, g.stft_frames(int(audio_end[i])) - k * C)
        valid_t = torch.from_numpy(valid).to(dev)
        frame_mask = torch.arange(C, device=dev)[None, :] >= valid_t[:, None]
        mel = mel.masked_fill(frame_mask[:, None, :], self.pad_value)
        return FeatureBatch(new_frames=mel, valid_frames=valid_t, valid_frames_host=valid)

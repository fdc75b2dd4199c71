"""Audio for the load generator: WAV files (or folders of them) cycled across streams, or a
built-in synthetic set, split into the audio messages each stream sends.

With `utterances` > 0 every item is a call instead: that many clips (the items in turn) joined
by `pause_s` of silence (exact zeros; one pause also follows the last clip, so its end can be
heard), with each utterance's speech (first to last sample above a small fraction of the clip's
peak) known in samples: what time to final is measured from.

With `stream_seconds` > 0 every stream lasts that long: item k becomes items k, k + 1, ...
(cycled) played back to back until the length is reached, cut there; calls are repeated whole
(never cut inside an utterance, so the stream may run a little past the length). Speech, not
silence padding: a long stream loads the server like a long phone call, where 6-second clips
measure stream churn (openings, first chunks, finals) as much as steady serving.

The load generator sends raw samples with the rate and encoding in the config (no WAV header),
so every message boundary is known in samples: that is what maps responses to messages.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.audio_source import FLOAT32, PCM16, wav_format
from client.synth_audio import synth_speechlike

_SAMPLE_BYTES = {PCM16: 2, FLOAT32: 4}


@dataclass(frozen=True)
class AudioItem:
    name: str
    data: bytes          # raw interleaved samples, little-endian
    sample_rate: int
    encoding: str        # PCM16 or FLOAT32
    channels: int = 1
    # Calls (AudioSpec.utterances > 0): each utterance's speech as (first, last + 1) sample.
    speech: tuple[tuple[int, int], ...] = ()

    @property
    def frame_bytes(self) -> int:
        return _SAMPLE_BYTES[self.encoding] * self.channels

    @property
    def n_samples(self) -> int:
        """Samples per channel."""
        return len(self.data) // self.frame_bytes

    @property
    def seconds(self) -> float:
        return self.n_samples / self.sample_rate

    def messages(self, chunk_ms: float) -> tuple[list[bytes], list[int]]:
        """The audio in messages of chunk_ms (the last may be shorter), and each message's
        cumulative end in samples per channel."""
        step = max(int(round(self.sample_rate * chunk_ms / 1000.0)), 1)
        pieces, ends = [], []
        fb = self.frame_bytes
        for start in range(0, self.n_samples, step):
            end = min(start + step, self.n_samples)
            pieces.append(self.data[start * fb:end * fb])
            ends.append(end)
        return pieces, ends


@dataclass(frozen=True)
class AudioSpec:
    """What every worker process needs to build the same audio items (picklable, small)."""

    paths: tuple[str, ...] = ()
    synthetic_clips: int = 8
    synthetic_seconds: float = 8.0
    synthetic_rate: int = 16000
    max_seconds: float = 0.0   # > 0: trim longer files to this many seconds
    utterances: int = 0        # > 0: each item is a call of this many clips joined by pauses
    pause_s: float = 1.0       # silence between (and after) a call's utterances
    stream_seconds: float = 0.0  # > 0: each stream plays items back to back for this long

    def load(self) -> list[AudioItem]:
        items = [read_wav(p) for p in expand_paths(self.paths)] if self.paths else synthetic_items(
            self.synthetic_clips, self.synthetic_seconds, self.synthetic_rate)
        if self.max_seconds > 0:
            items = [trim(i, self.max_seconds) for i in items]
        items = [i for i in items if i.n_samples > 0]
        if not items:
            raise ValueError("no audio: every file given is empty")
        if self.utterances > 0:
            items = [join_call(items, k, self.utterances, self.pause_s) for k in range(len(items))]
        if self.stream_seconds > 0:
            items = [lengthen(items, k, self.stream_seconds) for k in range(len(items))]
        return items


SPEECH_LEVEL = 0.02  # a sample is speech above this fraction of its clip's peak


def speech_bounds(item: AudioItem) -> tuple[int, int]:
    """First and last + 1 sample (per channel) whose level is above SPEECH_LEVEL of the clip's
    peak: where the clip's speech starts and ends (the whole clip when it is silent)."""
    a = np.abs(as_array(item).astype(np.float32)).reshape(-1, item.channels).max(axis=1)
    peak = float(a.max()) if a.size else 0.0
    loud = np.flatnonzero(a > SPEECH_LEVEL * peak) if peak > 0 else np.array([], dtype=np.int64)
    if loud.size == 0:
        return 0, item.n_samples
    return int(loud[0]), int(loud[-1]) + 1


def join_call(items: list[AudioItem], first: int, utterances: int, pause_s: float) -> AudioItem:
    """A call: items first, first + 1, ... (cycled) joined by pause_s of exact zeros, with one
    pause after the last; every clip must have the first's rate, encoding and channels."""
    parts, speech, at = [], [], 0
    head = items[first % len(items)]
    pause = bytes(int(round(pause_s * head.sample_rate)) * head.frame_bytes)
    for j in range(utterances):
        clip = items[(first + j) % len(items)]
        _check_same_format(head, clip, "--utterances")
        lo, hi = speech_bounds(clip)
        speech.append((at + lo, at + hi))
        parts += [clip.data, pause]
        at += clip.n_samples + len(pause) // head.frame_bytes
    return AudioItem(f"call-{first:03d}-{head.name}", b"".join(parts), head.sample_rate, head.encoding,
                     head.channels, tuple(speech))


def _check_same_format(head: AudioItem, clip: AudioItem, option: str) -> None:
    if (clip.sample_rate, clip.encoding, clip.channels) != (head.sample_rate, head.encoding, head.channels):
        raise ValueError(f"{option} joins clips of one format: {clip.name} ({clip.sample_rate} Hz "
                         f"{clip.encoding} x{clip.channels}) differs from {head.name} ({head.sample_rate} Hz "
                         f"{head.encoding} x{head.channels})")


def lengthen(items: list[AudioItem], first: int, seconds: float) -> AudioItem:
    """A stream of `seconds`: items first, first + 1, ... (cycled) back to back. Plain clips are
    cut at exactly that many samples; calls (items with speech windows) are appended whole, their
    windows shifted, so no utterance is cut and the stream is at least that long."""
    head = items[first % len(items)]
    want = int(round(seconds * head.sample_rate))
    parts, speech, at, j = [], [], 0, 0
    while at < want:
        clip = items[(first + j) % len(items)]
        _check_same_format(head, clip, "--stream-seconds")
        parts.append(clip.data)
        speech += [(lo + at, hi + at) for lo, hi in clip.speech]
        at += clip.n_samples
        j += 1
    data = b"".join(parts)
    if not head.speech:
        data = data[:want * head.frame_bytes]
    return AudioItem(f"long-{first:03d}-{head.name}", data, head.sample_rate, head.encoding, head.channels,
                     tuple(speech))


def expand_paths(paths: tuple[str, ...] | list[str]) -> list[str]:
    """Files as given; folders give their *.wav files (recursively, sorted)."""
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(str(f) for f in path.rglob("*") if f.suffix.lower() == ".wav" and f.is_file())
            if not found:
                raise ValueError(f"{p}: folder holds no .wav files")
            out.extend(found)
        elif path.is_file():
            out.append(str(path))
        else:
            raise ValueError(f"{p}: no such file or folder")
    return out


def read_wav(path: str) -> AudioItem:
    """A PCM16 or float32 WAV file's samples (any rate and channel count: the server resamples
    and mixes down)."""
    raw = Path(path).read_bytes()
    found = wav_format(raw[:1 << 16])
    if found is None:
        raise ValueError(f"{path}: not a WAV file the load generator reads (RIFF/WAVE PCM16 or float32)")
    fmt, offset = found
    size = struct.unpack_from("<I", raw, offset - 4)[0]
    data = raw[offset:offset + size] if size not in (0, 0xFFFFFFFF) else raw[offset:]
    frame = _SAMPLE_BYTES[fmt.encoding] * fmt.channels
    data = data[:len(data) - len(data) % frame]
    return AudioItem(Path(path).name, data, fmt.sample_rate, fmt.encoding, fmt.channels)


def trim(item: AudioItem, seconds: float) -> AudioItem:
    keep = int(seconds * item.sample_rate) * item.frame_bytes
    if len(item.data) <= keep:
        return item
    return AudioItem(item.name, item.data[:keep], item.sample_rate, item.encoding, item.channels)


def synthetic_items(clips: int, seconds: float, sample_rate: int = 16000) -> list[AudioItem]:
    if clips < 1 or seconds <= 0:
        raise ValueError("synthetic audio needs at least one clip of positive length")
    return [AudioItem(f"synthetic-{i:03d}", synth_speechlike(seconds, seed=1000 + i, sample_rate=sample_rate)
                      .astype("<i2").tobytes(), sample_rate, PCM16, 1) for i in range(clips)]


def as_array(item: AudioItem) -> np.ndarray:
    """The item's samples as an array (int16 or float32), interleaved channels."""
    return np.frombuffer(item.data, dtype="<i2" if item.encoding == PCM16 else "<f4")

"""Turn a stream's audio bytes into mono float32 samples at the model's rate.

Bytes arrive in messages of any size: a WAV header is recognised in the first bytes (it may be
split over several messages), PCM samples may be split between messages (the remainder waits
for the next one), and only the end of the stream must fall on a whole sample. Other sample
rates are resampled with soxr's streaming resampler, so a stream is resampled as one signal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.transport.wav_header import AudioError, SampleEncoding, WavHeader, sniff_audio_start

MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 192000
MAX_CHANNELS = 8
# FLOAT32 audio is in [-1, 1]; a little overshoot (a mix, a gain) is tolerated, values far
# beyond are not audio (3e38 overflowed the features silently).
MAX_FLOAT_SAMPLE = 16.0


@dataclass(frozen=True)
class AudioSpec:
    """What the client's config says about raw audio; a WAV header fills in what is unset."""

    encoding: SampleEncoding | None = None  # None: PCM16 for raw audio, or the WAV header's
    sample_rate: int = 0                    # 0: unknown (a WAV header must give it)
    channels: int = 0                       # 0: one, or the WAV header's

    def __post_init__(self) -> None:
        if self.sample_rate and not MIN_SAMPLE_RATE <= self.sample_rate <= MAX_SAMPLE_RATE:
            raise AudioError(f"sample_rate {self.sample_rate} Hz is outside the supported range "
                             f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
        if not 0 <= self.channels <= MAX_CHANNELS:
            raise AudioError(f"channels {self.channels} is outside the supported range 1..{MAX_CHANNELS}")


@dataclass(frozen=True)
class ResolvedFormat:
    encoding: SampleEncoding
    sample_rate: int
    channels: int
    wav: bool

    @property
    def frame_bytes(self) -> int:
        return self.encoding.sample_bytes * self.channels


class AudioDecoder:
    def __init__(self, spec: AudioSpec, target_rate: int, max_header_bytes: int = 1 << 16):
        self.spec = spec
        self.target_rate = target_rate
        self.max_header_bytes = max_header_bytes
        self.format: ResolvedFormat | None = None
        self._pending = b""               # header bytes, or a split sample
        self._data_left: int | None = None  # WAV data bytes still expected (None: unbounded)
        self._data_size = 0               # the WAV header's data size
        self._trailing = b""              # bytes after a WAV data chunk (other RIFF chunks, or lies)
        self._trailing_seen = 0
        self._resampler = None
        self.input_samples = 0            # per channel, at the sender's rate

    # -- public -----------------------------------------------------------------------------
    def feed(self, data: bytes) -> np.ndarray:
        if self.format is None:
            self._pending += data
            if not self._resolve(final=False):
                return _EMPTY
            data, self._pending = self._pending, b""  # the bytes after the header are new audio
        return self._decode(data, final=False)

    def finish(self) -> np.ndarray:
        """End of audio: flush the resampler; a partial sample left over is an error."""
        if self.format is None:
            if not self._pending:
                return _EMPTY  # no audio at all: an empty stream is fine
            self._resolve(final=True)
            data, self._pending = self._pending, b""
            return self._decode(data, final=True)
        return self._decode(b"", final=True)

    @property
    def input_seconds(self) -> float:
        return self.input_samples / self.format.sample_rate if self.format else 0.0

    # -- internals --------------------------------------------------------------------------
    def _resolve(self, final: bool) -> bool:
        """Decide WAV or raw from the first bytes; False while more bytes are needed."""
        buf = self._pending
        start = sniff_audio_start(buf, final, self.max_header_bytes)
        if start.need_more:
            return False
        header = start.header
        if header is not None:
            self._set_format(self._from_wav(header))
            self._pending = buf[header.data_offset:]
            self._data_left = header.data_size
            self._data_size = header.data_size or 0
            return True
        spec = self.spec
        if not spec.sample_rate:
            raise AudioError("sample_rate is required for raw audio (the audio does not start with a WAV header)")
        self._set_format(ResolvedFormat(spec.encoding or SampleEncoding.PCM16, spec.sample_rate,
                                        spec.channels or 1, wav=False))
        return True

    def _from_wav(self, header: WavHeader) -> ResolvedFormat:
        spec = self.spec
        if spec.sample_rate and spec.sample_rate != header.sample_rate:
            raise AudioError(f"config sample_rate is {spec.sample_rate} Hz but the WAV header says "
                             f"{header.sample_rate} Hz; send 0 or the file's rate")
        if spec.encoding and spec.encoding is not header.encoding:
            raise AudioError(f"config encoding is {spec.encoding.value} but the WAV header says "
                             f"{header.encoding.value}; leave it unspecified for WAV files")
        if spec.channels and spec.channels != header.channels:
            raise AudioError(f"config channels is {spec.channels} but the WAV header says {header.channels}")
        if not MIN_SAMPLE_RATE <= header.sample_rate <= MAX_SAMPLE_RATE:
            raise AudioError(f"WAV sample rate {header.sample_rate} Hz is outside the supported range "
                             f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
        if header.channels > MAX_CHANNELS:
            raise AudioError(f"WAV with {header.channels} channels; at most {MAX_CHANNELS} are supported")
        return ResolvedFormat(header.encoding, header.sample_rate, header.channels, wav=True)

    def _set_format(self, fmt: ResolvedFormat) -> None:
        self.format = fmt
        if fmt.sample_rate != self.target_rate:
            import soxr  # only streams that need it pay for the import

            self._resampler = soxr.ResampleStream(fmt.sample_rate, self.target_rate, 1,
                                                  dtype="float32", quality="HQ")

    def _decode(self, new: bytes, final: bool) -> np.ndarray:
        """Decode `new` bytes after the split sample kept from the previous message."""
        fmt = self.format
        assert fmt is not None
        if self._data_left is not None:  # bytes after a WAV data chunk are other chunks, not audio
            if len(new) > self._data_left:
                self._check_trailing(new[self._data_left:])
            new = new[:self._data_left]
            self._data_left -= len(new)
        data = self._pending + new if self._pending else new
        usable = len(data) - len(data) % fmt.frame_bytes
        self._pending = data[usable:]
        if final and self._pending:
            raise AudioError(f"audio ended on a partial {fmt.encoding.value} sample: {len(self._pending)} trailing "
                             f"byte(s); audio must be whole {fmt.frame_bytes}-byte frames "
                             f"({fmt.channels} channel(s) of {fmt.encoding.sample_bytes} bytes)")
        samples = self._to_float(data[:usable], fmt)
        self.input_samples += samples.size
        if self._resampler is not None and (samples.size or final):
            samples = self._resampler.resample_chunk(samples, last=final)
        return np.ascontiguousarray(samples, dtype=np.float32)

    def _check_trailing(self, extra: bytes) -> None:
        """Bytes after the data chunk the header announced are accepted only as what a WAV file
        may hold there: further RIFF chunks (LIST, id3, ...), a pad byte, within the header
        bound. Anything else means the header's data size is smaller than the audio sent, and
        dropping the rest silently would return a transcript of part of the audio."""
        self._trailing_seen += len(extra)
        if len(self._trailing) < 9:
            self._trailing += extra[:9 - len(self._trailing)]
        head = self._trailing[self._data_size & 1:]  # chunks start at even offsets
        chunk_like = len(head) < 4 or all(32 <= b < 127 for b in head[:4])
        if not chunk_like or self._trailing_seen > self.max_header_bytes:
            raise AudioError(f"the WAV header's data size is {self._data_size} bytes, but more audio followed "
                             f"({self._trailing_seen}+ bytes after it that are no RIFF chunk); fix the header "
                             "(or stream with an open data size: 0 or 0xFFFFFFFF)")

    @staticmethod
    def _to_float(data: bytes, fmt: ResolvedFormat) -> np.ndarray:
        if not data:
            return _EMPTY
        if fmt.encoding is SampleEncoding.PCM16:
            # x / 32768 is exact in float32 (a power of two, so scaling in place by 2**-15 gives
            # the same bits with one array, not two); tests rely on the same conversion.
            samples = np.frombuffer(data, dtype="<i2").astype(np.float32)
            samples *= np.float32(1.0 / 32768.0)
        else:
            samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
            if not np.isfinite(samples).all():
                raise AudioError("FLOAT32 audio contains NaN or infinite samples")
            peak = float(np.abs(samples).max())
            if peak > MAX_FLOAT_SAMPLE:
                raise AudioError(f"FLOAT32 sample of magnitude {peak:.3g}: samples must lie in [-1, 1] "
                                 f"(up to {MAX_FLOAT_SAMPLE:g} is tolerated)")
        if fmt.channels > 1:
            samples = samples.reshape(-1, fmt.channels).mean(axis=1, dtype=np.float32)
        return samples


_EMPTY = np.zeros(0, dtype=np.float32)

"""Parse a RIFF/WAVE header from the first bytes of a stream (which may arrive in pieces)."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass


class AudioError(ValueError):
    """The audio cannot be decoded; the message tells the client what was wrong."""


class SampleEncoding(enum.Enum):
    PCM16 = "PCM16"
    FLOAT32 = "FLOAT32"

    @property
    def sample_bytes(self) -> int:
        return 2 if self is SampleEncoding.PCM16 else 4


_FORMAT_PCM, _FORMAT_FLOAT, _FORMAT_EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
_UNBOUNDED_SIZES = (0, 0xFFFFFFFF)  # streaming writers leave the data size open


@dataclass(frozen=True)
class WavHeader:
    encoding: SampleEncoding
    sample_rate: int
    channels: int
    data_offset: int          # bytes before the first sample
    data_size: int | None     # None: up to the end of the stream


def looks_like_wav(prefix: bytes) -> bool:
    return len(prefix) >= 12 and prefix[:4] == b"RIFF" and prefix[8:12] == b"WAVE"


_SNIFF_BYTES = 12  # "RIFF" <size> "WAVE"


@dataclass(frozen=True)
class AudioStart:
    """What a stream's first bytes say: a WAV header, raw samples, or not yet known."""

    header: WavHeader | None  # the WAV header, when the stream starts with one
    need_more: bool = False   # the bytes so far could still begin a WAV header: wait for more


def sniff_audio_start(buf: bytes, final: bool, max_header_bytes: int) -> AudioStart:
    """Decide from a stream's first bytes (all that arrived, `final` when no more will) whether
    they begin a WAV header. Fewer than 12 bytes that could start "RIFF....WAVE" wait for more;
    a header cut off by the end of the stream is an AudioError. Both APIs' decoders use this, so
    the native and the Riva stream judge the same bytes the same way."""
    if not final and len(buf) < _SNIFF_BYTES and b"RIFF".startswith(buf[:4]):
        return AudioStart(None, need_more=True)
    if not looks_like_wav(buf):
        return AudioStart(None)
    header = parse_wav_header(buf, max_header_bytes)
    if header is None:
        if final:
            raise AudioError("audio ended inside the WAV header")
        return AudioStart(None, need_more=True)
    return AudioStart(header)


def parse_wav_header(buf: bytes, max_header_bytes: int) -> WavHeader | None:
    """The header, or None while more bytes are needed. Raises AudioError on a bad header."""
    if not looks_like_wav(buf):
        raise AudioError("not a RIFF/WAVE header")
    pos, fmt = 12, None
    while True:
        if pos + 8 > len(buf):
            break
        chunk_id, size = buf[pos:pos + 4], struct.unpack_from("<I", buf, pos + 4)[0]
        body = pos + 8
        if chunk_id == b"data":
            if fmt is None:
                raise AudioError("WAV header: the data chunk comes before the fmt chunk")
            return WavHeader(*fmt, data_offset=body, data_size=None if size in _UNBOUNDED_SIZES else size)
        if body + size > len(buf):
            break
        if chunk_id == b"fmt ":
            fmt = _parse_fmt(buf[body:body + size])
        pos = body + size + (size & 1)  # chunks are padded to an even size
    if len(buf) > max_header_bytes:
        raise AudioError(f"WAV header: no data chunk within the first {max_header_bytes} bytes")
    return None


def _parse_fmt(body: bytes) -> tuple[SampleEncoding, int, int]:
    if len(body) < 16:
        raise AudioError(f"WAV header: fmt chunk of {len(body)} bytes is too short")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
    if tag == _FORMAT_EXTENSIBLE and len(body) >= 26:
        tag = struct.unpack_from("<H", body, 24)[0]  # first bytes of the SubFormat GUID
    if tag == _FORMAT_PCM and bits == 16:
        encoding = SampleEncoding.PCM16
    elif tag == _FORMAT_FLOAT and bits == 32:
        encoding = SampleEncoding.FLOAT32
    else:
        kind = {_FORMAT_PCM: "PCM", _FORMAT_FLOAT: "float"}.get(tag, f"format tag 0x{tag:04x}")
        raise AudioError(f"WAV {kind} with {bits}-bit samples is not supported; send 16-bit PCM or 32-bit float")
    if channels < 1:
        raise AudioError("WAV header: zero channels")
    return encoding, rate, channels

"""Audio sources for the client: files sent as they are (the server recognises a WAV header),
arrays or any iterable of chunks, with optional real-time pacing."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PCM16, FLOAT32 = "PCM16", "FLOAT32"
_SAMPLE_BYTES = {PCM16: 2, FLOAT32: 4}


@dataclass(frozen=True)
class AudioFormat:
    """What the server must be told about raw audio (a WAV file tells it itself)."""

    sample_rate: int = 0      # 0 for WAV files
    encoding: str = PCM16     # PCM16 or FLOAT32
    channels: int = 1
    wav: bool = False

    @property
    def bytes_per_second(self) -> int:
        return self.sample_rate * self.channels * _SAMPLE_BYTES[self.encoding]


def wav_format(head: bytes) -> tuple[AudioFormat, int] | None:
    """(format, byte offset of the samples) for a RIFF/WAVE header, else None."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, fmt = 12, None
    while pos + 8 <= len(head):
        chunk_id, size = head[pos:pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
        if chunk_id == b"fmt ":
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", head, pos + 8)
            if tag == 0xFFFE:
                tag = struct.unpack_from("<H", head, pos + 8 + 24)[0]
            fmt = AudioFormat(rate, FLOAT32 if tag == 3 else PCM16, channels, wav=True)
        elif chunk_id == b"data":
            return (fmt, pos + 8) if fmt else None
        pos += 8 + size + (size & 1)
    return None


def file_chunks(path: str | Path, chunk_ms: float = 100.0, fmt: AudioFormat | None = None
                ) -> tuple[AudioFormat, Iterator[bytes]]:
    """The file's format and its bytes in chunks of about chunk_ms of audio. A WAV file is sent
    whole (header first); raw files need `fmt`."""
    data = Path(path).read_bytes()
    found = wav_format(data[:1 << 16])
    if found is not None:
        fmt, offset = found
    elif fmt is None or not fmt.sample_rate:
        raise ValueError(f"{path}: not a WAV file; give the raw audio's sample rate and encoding")
    else:
        offset = 0
    frame = _SAMPLE_BYTES[fmt.encoding] * fmt.channels
    step = max(int(fmt.bytes_per_second * chunk_ms / 1000) // frame, 1) * frame  # whole samples

    def chunks() -> Iterator[bytes]:
        yield data[:offset + step]  # the header travels with the first audio
        for pos in range(offset + step, len(data), step):
            yield data[pos:pos + step]

    return fmt, chunks()


def to_bytes(chunk: bytes | np.ndarray) -> bytes:
    """bytes as they are; int16 arrays as PCM16, float arrays as FLOAT32 (little-endian)."""
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return bytes(chunk)
    array = np.asarray(chunk)
    if array.dtype == np.int16:
        return array.astype("<i2").tobytes()
    return array.astype("<f4").tobytes()


def encoding_of(chunk: bytes | np.ndarray) -> str | None:
    if isinstance(chunk, np.ndarray):
        return PCM16 if chunk.dtype == np.int16 else FLOAT32
    return None


def array_chunks(samples: np.ndarray, sample_rate: int, chunk_ms: float = 100.0) -> Iterator[np.ndarray]:
    """Split an array of samples (int16 or float) into chunks of chunk_ms, like a microphone."""
    step = max(int(sample_rate * chunk_ms / 1000), 1)
    for pos in range(0, len(samples), step):
        yield samples[pos:pos + step]


def paced(chunks: Iterable[bytes], bytes_per_second: float) -> Iterator[bytes]:
    """Yield chunks no faster than real time (each after the audio before it has 'played')."""
    start, sent = time.monotonic(), 0
    for chunk in chunks:
        delay = start + sent / bytes_per_second - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield chunk
        sent += len(chunk) if isinstance(chunk, (bytes, bytearray)) else 0  # not audio: an END_UTTERANCE


async def apaced(chunks: Iterable[bytes], bytes_per_second: float) -> AsyncIterator[bytes]:
    start, sent = time.monotonic(), 0
    for chunk in chunks:
        delay = start + sent / bytes_per_second - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield chunk
        sent += len(chunk) if isinstance(chunk, (bytes, bytearray)) else 0  # not audio: an END_UTTERANCE

"""Typed objects the scheduler hands to the transport layer. Pure Python, no gRPC, no torch.

The scheduler speaks in ErrorKind; the servicer maps each kind to the gRPC status code of the
same name, so the scheduler stays transport-free and testable on its own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from engines.api import TokenEvent


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"


class StreamError(Exception):
    """A request cannot be served; `kind` says which status the client gets."""

    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(slots=True)  # not frozen: built per chunk, and a frozen init costs twice as much; never mutated
class ChunkResult:
    """One processed chunk of a stream (or the final that needed no further step)."""

    stream_id: str
    chunk_index: int              # -1 when no step ran for the stream
    transcript: str               # whole transcript so far
    new_text: str                 # what this chunk added
    is_final: bool
    audio_seconds: float          # audio decoded so far, at the model's sample rate
    tokens: tuple[TokenEvent, ...]  # every token of the stream, on finals only (else empty)
    audio_ready_at: float         # monotonic time the audio that made this chunk ready arrived


@dataclass(frozen=True)
class StreamFailure:
    """The stream ended with an error; no more results follow."""

    stream_id: str
    kind: ErrorKind
    message: str


StreamEvent = ChunkResult | StreamFailure

"""Typed objects the scheduler hands to the transport layer. Pure Python, no gRPC, no torch.

The scheduler speaks in ErrorKind; the servicer maps each kind to the gRPC status code of the
same name, so the scheduler stays transport-free and testable on its own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from engines.api import TokenEvent
from server.scheduling.row_columns import RowColumns


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


class UtteranceEnd(enum.Enum):
    """What closed an utterance."""

    ENDPOINT = "endpoint"          # the endpointer heard the speaker stop (or the model's EOU token)
    CLIENT = "client"              # the client asked for the final (its own turn detector)
    END_OF_AUDIO = "end_of_audio"  # the stream's audio ended (half-close, or the duration limit)


@dataclass(frozen=True)
class Utterance:
    """One closed utterance of a stream: its final. Its tokens are three columns, as the
    utterance book keeps them (server.scheduling.utterances): a final is built once per
    utterance on a frontend's event loop, and one TokenEvent per token (a tuple the garbage
    collector tracks) was a third of that work for a long utterance; `tokens` builds them for
    a caller that wants them."""

    index: int                      # 0, 1, ... in the stream
    transcript: str
    token_ids: tuple[int, ...]      # its tokens, in order
    pieces: tuple[str, ...]
    frames: tuple[int, ...]         # each token's encoder frame, counted from the stream's start
    start_seconds: float            # from the stream's start
    end_seconds: float
    closed_by: UtteranceEnd

    @classmethod
    def of_tokens(cls, index: int, transcript: str, tokens: tuple[TokenEvent, ...], start_seconds: float,
                  end_seconds: float, closed_by: UtteranceEnd) -> Utterance:
        ids, pieces, frames = (tuple(c) for c in zip(*tokens)) if tokens else ((), (), ())
        return cls(index, transcript, ids, pieces, frames, start_seconds, end_seconds, closed_by)

    @property
    def tokens(self) -> tuple[TokenEvent, ...]:
        return tuple(map(TokenEvent, self.token_ids, self.pieces, self.frames))


@dataclass(slots=True)  # not frozen: built per chunk, and a frozen init costs twice as much; never mutated
class ChunkResult:
    """One processed chunk of a stream (or the final that needed no further step).

    A stream is a sequence of utterances (one, when endpointing is off). `transcript` is the
    open utterance's text so far; `finals` holds the utterances this chunk closed, in order.
    `is_final` marks the stream's last event: the end of its audio closed the last utterance
    (in `finals`, unless it held no text and an earlier utterance had a final)."""

    stream_id: str
    chunk_index: int              # -1 when no step ran for the stream
    transcript: str               # the open utterance's text so far (on the stream's final: the last one's)
    new_text: str                 # what this chunk added to it
    is_final: bool                # the stream's last event
    audio_seconds: float          # audio decoded so far, at the model's sample rate
    audio_ready_at: float         # monotonic time the audio that made this chunk ready arrived
    utterance_index: int = 0      # index of the open utterance
    finals: tuple[Utterance, ...] = ()


@dataclass(frozen=True)
class StreamFailure:
    """The stream ended with an error; no more results follow."""

    stream_id: str
    kind: ErrorKind
    message: str


StreamEvent = ChunkResult | StreamFailure


@dataclass(slots=True)
class ChunkRows:
    """A step's answered chunks for a listener that makes the events itself
    (server.runtime.engine_host: its frontend processes keep each stream's text): row i is
    streams[i]'s chunk, its values in `columns`. The scheduler's process makes no object per row."""

    streams: list          # StreamState per row
    columns: RowColumns

    def __len__(self) -> int:
        return len(self.streams)

    def take(self, positions: list[int]) -> ChunkRows:
        """These rows, in this order."""
        return ChunkRows([self.streams[p] for p in positions], self.columns.take(positions))

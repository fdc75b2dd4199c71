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


class UtteranceEnd(enum.Enum):
    """What closed an utterance."""

    ENDPOINT = "endpoint"          # the endpointer heard the speaker stop (or the model's EOU token)
    CLIENT = "client"              # the client asked for the final (its own turn detector)
    END_OF_AUDIO = "end_of_audio"  # the stream's audio ended (half-close, or the duration limit)


@dataclass(frozen=True)
class Utterance:
    """One closed utterance of a stream: its final."""

    index: int                      # 0, 1, ... in the stream
    transcript: str
    tokens: tuple[TokenEvent, ...]  # its tokens, frames counted from the stream's start
    start_seconds: float            # from the stream's start
    end_seconds: float
    closed_by: UtteranceEnd


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
    """Answered chunks of several streams as columns, for a listener that turns them into events
    itself (server.runtime.engine_host: a frontend process keeps each stream's text and builds
    its events, server.scheduling.utterances.chunk_event), so the scheduler's process makes no
    object per row. Row i is streams[i]'s chunk; its tokens are ids/pieces/frames[tok_end[i-1]:
    tok_end[i]] (from 0 for row 0). `final_due`: the client's final is due after this chunk;
    `starts`/`ends`: the endpointer's events (encoder frames) of the rows that had any."""

    streams: list          # StreamState per row
    consumed: list[int]    # samples of the stream the engine has taken, after this chunk
    chunk: list[int]
    audio_seconds: list[float]
    ready_at: list[float]
    is_final: list[bool]
    final_due: list[bool]
    tok_end: list[int]
    ids: list[int]
    pieces: list[str]
    frames: list[int]
    text: list[str]
    starts: dict[int, tuple[int, ...]]
    ends: dict[int, tuple[int, ...]]

    def __len__(self) -> int:
        return len(self.streams)

    def take(self, positions: list[int]) -> ChunkRows:
        """These rows, in this order (a frontend's share of a step, or a step's rows without
        those of streams that ended while it ran)."""
        def pick(column: list) -> list:
            return [column[p] for p in positions] if len(column) == len(self.tok_end) else []

        out = ChunkRows(pick(self.streams), pick(self.consumed), pick(self.chunk), pick(self.audio_seconds),
                        pick(self.ready_at), pick(self.is_final), pick(self.final_due), [], [], [], [],
                        pick(self.text), {}, {})
        ends, ids, pieces, frames = self.tok_end, self.ids, self.pieces, self.frames
        tok_end, out_ids, out_pieces, out_frames = out.tok_end, out.ids, out.pieces, out.frames
        for p in positions:
            b = ends[p]
            a = ends[p - 1] if p else 0
            if b > a:
                out_ids += ids[a:b]
                out_pieces += pieces[a:b]
                out_frames += frames[a:b]
            tok_end.append(len(out_ids))
        if self.starts or self.ends:
            for i, p in enumerate(positions):
                if p in self.starts:
                    out.starts[i] = self.starts[p]
                if p in self.ends:
                    out.ends[i] = self.ends[p]
        return out

"""Per-stream bookkeeping of the scheduler: one dataclass, one status enum, one place that
changes the status. Pure Python (numpy for sample buffers), no gRPC, no torch.
"""

from __future__ import annotations

import asyncio
import collections
import enum
from dataclasses import dataclass, field

import numpy as np

from engines.api import EndpointingParams
from server.scheduling.stream_events import StreamEvent
from server.scheduling.utterances import UtteranceBook


class StreamStatus(enum.Enum):
    RECEIVING = "receiving"   # audio may still arrive
    FLUSHING = "flushing"     # audio ended; the remaining chunks run, then the final
    FINISHED = "finished"     # final result emitted
    FAILED = "failed"         # error emitted
    CANCELLED = "cancelled"   # the client left before a final or an error

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def accepts_chunks(self) -> bool:
        return self in (StreamStatus.RECEIVING, StreamStatus.FLUSHING)


_TERMINAL = frozenset({StreamStatus.FINISHED, StreamStatus.FAILED, StreamStatus.CANCELLED})
_ALLOWED = {
    StreamStatus.RECEIVING: {StreamStatus.FLUSHING, StreamStatus.FAILED, StreamStatus.CANCELLED},
    StreamStatus.FLUSHING: {StreamStatus.FINISHED, StreamStatus.FAILED, StreamStatus.CANCELLED},
}


class SampleQueue:
    """Received samples not yet in the stream's sample ring (engines.sample_ring: a client that
    sent more than the ring has room for), as a list of arrays.

    Appends are O(1) and a take concatenates only what it returns, so a client that sends a
    whole file at once does not cost a quadratic number of copies.
    """

    def __init__(self) -> None:
        self._parts: collections.deque[np.ndarray] = collections.deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, samples: np.ndarray) -> None:
        """Samples as float32, contiguous (a copy only when they are not), so a take is a view."""
        if samples.size:
            self._parts.append(np.ascontiguousarray(samples, dtype=np.float32))
            self._size += samples.size

    def take(self, n: int) -> np.ndarray:
        parts = self._parts
        if parts and 0 < n <= parts[0].size:
            # The usual take: one chunk from the front message (a frontend's messages end on
            # chunk boundaries), as the message itself or a view of it.
            head = parts[0]
            self._size -= n
            if head.size == n:
                return parts.popleft()
            parts[0] = head[n:]
            return head[:n]
        if n > self._size:
            raise ValueError(f"take({n}) from a queue of {self._size} samples")
        out: list[np.ndarray] = []
        need = n
        while need:
            head = self._parts[0]
            if head.size <= need:
                out.append(self._parts.popleft())
                need -= head.size
            else:
                out.append(head[:need])
                self._parts[0] = head[need:]
                need = 0
        self._size -= n
        if not out:
            return np.zeros(0, dtype=np.float32)
        return np.ascontiguousarray(out[0] if len(out) == 1 else np.concatenate(out), dtype=np.float32)


@dataclass(eq=False)
class StreamState:
    stream_id: str
    slot: int
    label: str
    opened_at: float
    status: StreamStatus = StreamStatus.RECEIVING
    audio: SampleQueue = field(default_factory=SampleQueue)  # received, not in the sample ring yet (no room)
    received: int = 0                 # samples received in all (at the model's rate)
    ended_at: float | None = None     # when the end of audio arrived
    next_chunk: int = 0               # index of the next chunk to hand to the engine
    in_flight: bool = False           # a chunk of this stream is in a submitted step
    slot_released: bool = False
    audio_seconds: float = 0.0        # audio decoded so far, as the engine reports it
    # Utterances: the open one's text and tokens (server.scheduling.utterances), the stream's endpointing
    # (None: off, one utterance per stream), the next chunk starts a new utterance (the engine
    # resets its endpointer there), and a client's request for the final, due once the chunks
    # complete at the request have run (their count) and when it came.
    utterances: UtteranceBook = field(default_factory=lambda: UtteranceBook(0.08))
    endpointing: EndpointingParams | None = None
    new_utterance_next: bool = False
    final_due_after: int | None = None
    final_requested_at: float = 0.0
    events: collections.deque[StreamEvent] = field(default_factory=collections.deque)
    events_ready: asyncio.Event = field(default_factory=asyncio.Event)
    audio_room: asyncio.Event = field(default_factory=asyncio.Event)  # set: pending audio under the limit
    terminal_delivered: bool = False  # the consumer has taken the final or the failure
    finalize_at_limit: bool = True    # at max_stream_seconds: end with a final (else OUT_OF_RANGE)
    end_reason: str | None = None     # why the server ended the audio (None: the client half-closed)
    time_limit: asyncio.TimerHandle | None = None  # max_stream_seconds of wall time
    peak_pending: int = 0             # most samples ever waiting at once (memory bound, for tests)
    # A frontend process writes the stream's audio into the sample ring (server.runtime.engine_host):
    # its slot does not go back to the pool until the frontend has said it writes no more.
    writer_attached: bool = False
    peak_events: int = 0              # most undelivered results ever held at once

    def set_status(self, new: StreamStatus) -> None:
        """The one place a stream's status changes; illegal transitions are bugs."""
        if new not in _ALLOWED.get(self.status, ()):
            raise RuntimeError(f"stream {self.stream_id}: illegal status change {self.status.value} -> {new.value}")
        self.status = new
        if new.terminal:
            # Wake whoever waits on this stream: nothing more will come.
            self.audio_room.set()
            self.events_ready.set()

    @property
    def transcript(self) -> str:
        """The open utterance's text so far."""
        return self.utterances.transcript

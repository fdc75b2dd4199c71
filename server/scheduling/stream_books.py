"""What every scheduler keeps about its open streams for the transport: the open set and the
drain that waits for it to empty, the wait for a stream's next event, and the wait for room
for more audio (backpressure, and its two failures).

Two schedulers share it: server.scheduling.scheduler.Scheduler (the engine in this process) and
server.runtime.remote_scheduler.RemoteScheduler (a frontend process, the engine in another). They
differ in how many samples of a stream are pending (`_pending_samples`), how an event is taken
(`take_event`) and how a stream fails (`_fail`). Pure Python, no gRPC, no torch.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from engines.api import EndpointingParams
from server.scheduling.stream_events import ErrorKind, StreamEvent
from server.scheduling.stream_state import StreamState, StreamStatus

if TYPE_CHECKING:
    from server.scheduling.scheduler import StreamHandle


@runtime_checkable
class StreamScheduler(Protocol):
    """The face the transport holds, whatever runs the engine: server.scheduling.scheduler's
    Scheduler (the engine in this process, or in its worker), server.runtime.remote_scheduler's
    RemoteScheduler (a frontend process; the engine host in another) and
    server.runtime.engine_cores' EngineCores (several engine cores). The servicers, StreamHandle
    and health use only this; tests/test_stream_face.py checks that each of the three has every
    member, with these parameters, so the three cannot drift apart unseen. An implementation may
    take more keyword parameters (the engine host opens its relayed streams under their ids)."""

    draining: bool
    dead_reason: str | None

    @property
    def active_streams(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    def slots_in_use(self) -> int: ...
    @property
    def ready_streams(self) -> int: ...
    def check_admission(self) -> None: ...
    def open_stream(self, label: str = "", finalize_at_limit: bool = True,
                    endpointing: EndpointingParams | None = None) -> StreamHandle: ...
    async def push_audio(self, stream: StreamState, samples: np.ndarray) -> bool: ...
    def end_audio(self, stream: StreamState) -> None: ...
    def fail_stream(self, stream: StreamState, kind: ErrorKind, message: str) -> None: ...
    def end_utterance(self, stream: StreamState) -> bool: ...
    async def next_event(self, stream: StreamState) -> StreamEvent | None: ...
    def take_event(self, stream: StreamState) -> StreamEvent | None: ...
    def close_stream(self, stream: StreamState) -> None: ...
    def begin_drain(self) -> None: ...
    async def wait_idle(self, timeout_s: float) -> bool: ...


class StreamBooks:
    # Set by the subclass: `config` (a SchedulerConfig), `engine` (with `capacity` and
    # `geometry`), `_max_pending` (samples a stream may have pending before push_audio waits).

    def __init__(self) -> None:
        self._streams: dict[str, StreamState] = {}
        self._idle = asyncio.Event()  # set while no stream is open
        self._idle.set()
        self.draining = False
        self.dead_reason: str | None = None

    # -- the open set ----------------------------------------------------------------------
    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def capacity(self) -> int:
        return self.engine.capacity

    def begin_drain(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no stream is open (drain); True when that happened within timeout_s."""
        if not self._streams:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _add(self, stream: StreamState) -> None:
        self._streams[stream.stream_id] = stream
        self._idle.clear()

    def _forget(self, stream: StreamState) -> bool:
        """Drop a stream from the open set; True when it was there."""
        if self._streams.pop(stream.stream_id, None) is None:
            return False
        if not self._streams:
            self._idle.set()
        return True

    # -- per stream --------------------------------------------------------------------------
    async def next_event(self, stream: StreamState) -> StreamEvent | None:
        while not stream.events:
            if stream.terminal_delivered or stream.status is StreamStatus.CANCELLED:
                return None
            stream.events_ready.clear()
            await stream.events_ready.wait()
        return self.take_event(stream)

    def take_event(self, stream: StreamState) -> StreamEvent | None:
        raise NotImplementedError

    def _pending_samples(self, stream: StreamState) -> int:
        raise NotImplementedError

    def _fail(self, stream: StreamState, kind: ErrorKind, message: str) -> None:
        raise NotImplementedError

    async def _wait_for_audio_room(self, stream: StreamState) -> bool:
        """Wait while the stream has more than _max_pending samples pending. A client whose
        results also pile up (it reads nothing) fails with RESOURCE_EXHAUSTED; no room for
        stall_timeout_s fails with DEADLINE_EXCEEDED. True while the stream still takes audio."""
        cfg, rate = self.config, self.engine.geometry.sample_rate
        while self._pending_samples(stream) > self._max_pending and stream.status is StreamStatus.RECEIVING:
            if len(stream.events) >= cfg.response_buffer:
                # Neither results nor audio move: the client stopped reading. Its buffers are full.
                self._fail(stream, ErrorKind.RESOURCE_EXHAUSTED,
                           f"the client is not reading responses: {len(stream.events)} results undelivered and "
                           f"{self._pending_samples(stream) / rate:.1f} s of audio waiting "
                           f"(limits: {cfg.response_buffer} results, "
                           f"{cfg.max_pending_seconds:g} s of audio per stream)")
                break
            stream.audio_room.clear()
            try:
                await asyncio.wait_for(stream.audio_room.wait(), cfg.stall_timeout_s)
            except TimeoutError:
                self._fail(stream, ErrorKind.DEADLINE_EXCEEDED,
                           f"no progress for {cfg.stall_timeout_s:g} s with "
                           f"{self._pending_samples(stream) / rate:.1f} s of audio pending: "
                           "the server is overloaded")
        return stream.status is StreamStatus.RECEIVING

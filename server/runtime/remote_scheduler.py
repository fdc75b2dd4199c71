"""A frontend process's scheduler: the same face as server.scheduling.scheduler.Scheduler to the
servicers, with the real scheduler in the engine process (server.runtime.engine_host) at the other
end of a Unix socket.

What stays here and what goes there:
  - here: the stream's view for its handler (status, undelivered events, the end reason), its
    utterances and text, made into its events from the engine's rows of token columns
    (server.scheduling.utterances.chunk_event, as an in-process scheduler makes them), the
    audio backpressure (pending = sent - consumed, the consumed count arriving with each
    row), failures the transport decides (bad audio, cancellation, a client not reading);
  - there: admission (slots), batching, the duration limits, the engine's results.

A stream's audio goes to the engine process when it completes a chunk (the engine can do
nothing with less): a voice agent's 20 ms packets would otherwise each be a write that the
engine process, whose loop binds the server's capacity, reads and books. Held audio is also
released before the stream's end or an end of utterance is sent, when it would pass the
stream's duration limit, and once it has waited HOLD_MAX_S (a client that stopped sending
mid-chunk: the engine's wall-time limit then still sees its audio).

Released audio is written straight into the stream's row of its engine core's sample ring
(engines.sample_ring, shared memory the engine process and its worker map; the row comes with
Opened), never more than the ring's width past what the engine has consumed: the rest waits here
until the rows say the engine took more. One Written message a loop iteration tells the engine
process how far every stream written meanwhile now goes, and End or EndUtterance follow only
once the audio before them is written and said. Where the rings cannot be mapped the audio goes
in Audio messages, the engine process copying it into the ring.

A stream is opened without a round trip: its first event is the engine's refusal when there
is no room, which the handler turns into RESOURCE_EXHAUSTED exactly as for a local refusal.
If the engine process goes away, every open stream fails with UNAVAILABLE and the frontend
reports itself dead (health NOT_SERVING), like a local engine death.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from engines.api import EndpointingParams
from engines.sample_ring import SampleRing
from server.runtime import wire as w
from server.transport.call_limits import CLIENT_IDENTITY
from server.runtime.engine_host import EngineFacts
from server.runtime.wire import FrameReader, FrameWriter
from server.ops.metrics import ServerMetrics
from server.scheduling.loop_calls import OncePerIteration
from server.scheduling.scheduler import SchedulerConfig, SchedulerObserver, StreamHandle
from server.scheduling.stream_books import StreamBooks
from server.scheduling.stream_events import ErrorKind, StreamError, StreamEvent, StreamFailure
from server.scheduling.stream_state import StreamState, StreamStatus
from server.scheduling.utterances import UtteranceBook, chunk_event, final_latency

log = logging.getLogger("nemostream.remote_scheduler")
# A frontend's garbage-collection pauses and written-chunk latencies go to the engine process
# this often (RemoteMetrics).
METRICS_FORWARD_PERIOD_S = 0.5
# A frontend's frames to the engine process at most this often while it is busy (an idle link's
# message goes at once; server.runtime.wire.FrameWriter says why): a millisecond against a
# chunk of 80-560 ms of audio.
FRAME_INTERVAL_S = 0.001
# A frontend's count of audio seconds goes to the engine process at most this often (and before
# every RPC's end): a metric, read by scrapes seconds apart.
AUDIO_SECONDS_PERIOD_S = 0.1
# Audio short of a chunk waits in the frontend at most this long (checked every HOLD_SWEEP_S).
HOLD_MAX_S = 0.25
HOLD_SWEEP_S = 0.05


@dataclass(eq=False)
class RemoteStreamState(StreamState):
    consumed: int = 0   # samples the engine has taken from this stream (from its last event)
    unacked: int = 0    # events taken by the handler and not yet acknowledged to the engine
    held: list[bytes] = field(default_factory=list)  # audio not delivered yet (samples sent..received)
    held_since: float = 0.0  # when the oldest audio not released yet arrived
    forward_at: int = 0      # `received` at which the held audio completes a chunk and is released
    release_to: int = 0      # audio up to here goes out now (or as soon as the ring has room for it)
    sent: int = 0            # samples delivered: written into the engine core's ring, or sent
    # The engine core's sample ring and its row (Opened); awaiting_slot: asked for one, no answer yet.
    ring: SampleRing | None = None
    core: int = -1
    awaiting_slot: bool = False
    # End and EndUtterance wait here, as (samples, message), until that much audio is delivered.
    after_audio: list[tuple[int, w.Message]] = field(default_factory=list)


class RemoteScheduler(StreamBooks):
    def __init__(self, socket_path: str, name: str = "frontend"):
        super().__init__()
        self.socket_path = socket_path
        self.name = name
        self.observer = SchedulerObserver()
        self.facts: EngineFacts | None = None
        self.config = SchedulerConfig()
        self.engine_name: str | None = None
        self.executions: dict[str, int] = {}
        self.max_batch = 1
        self._engine_slots = 0
        self._engine_draining = False
        self._ack_every = 1
        self._out: FrameWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._stopping = False
        self._max_pending = 0
        self.disconnected = asyncio.Event()  # the engine process's connection ended
        self._syncs: dict[int, asyncio.Future] = {}
        self._sync_token = 0
        self._max_samples = 0
        self._holding: dict[str, RemoteStreamState] = {}  # streams with audio not released, oldest first
        self._sweeper: asyncio.Task | None = None
        # The engine cores' sample rings (Hello), mapped here: this frontend writes its streams'
        # audio into them. Empty: audio goes in Audio messages.
        self._rings: list[SampleRing] = []
        self._written: dict[int, dict[int, int]] = {}  # core -> {ring row: samples written}, not yet said
        self._written_soon = OncePerIteration(self._flush_written)

    # -- lifecycle -----------------------------------------------------------------------
    async def connect(self, timeout_s: float = 30.0) -> EngineFacts:
        """Connect and read the engine's Hello (and first State)."""
        frames = await asyncio.wait_for(w.open_link(self.socket_path, w.ENGINE_TO_FRONTEND), timeout_s)
        self._out = FrameWriter(frames.transport, min_interval_s=FRAME_INTERVAL_S)
        batch = await asyncio.wait_for(frames.read_frames(), timeout_s)
        first = batch[0] if batch else None
        if not first:
            raise w.WireError("the engine process closed the connection before its Hello")
        self.facts = EngineFacts.from_hello(first[0])
        self.config = self.facts.scheduler
        self._ack_every = max(1, self.config.response_buffer // 2)
        self.max_batch = self.facts.max_batch
        self.engine_name = self.facts.engine_name
        self._max_pending = self.config.max_pending_samples(self.facts.geometry)
        self._max_samples = self.config.max_stream_samples(self.facts.geometry)
        self._rings = self._attach_rings(self.facts.rings)
        for message in [*first[1:], *(m for frame in batch[1:] for m in frame)]:
            self._dispatch(message)
        self._reader_task = asyncio.get_running_loop().create_task(self._read(frames), name="engine-reader")
        return self.facts

    def _attach_rings(self, rings: list) -> list[SampleRing]:
        """Map the engine cores' sample rings; none (audio in messages) if any cannot be."""
        try:
            return [SampleRing.attach(r.path, r.slots, r.width) for r in rings]
        except (OSError, ValueError) as exc:
            log.warning("cannot map the engine's sample rings; audio goes in messages", extra={"error": str(exc)})
            return []

    @property
    def engine(self) -> EngineFacts:
        assert self.facts is not None, "connect() first"
        return self.facts

    async def start(self) -> None:
        if self._out is None:
            await self.connect()

    async def warmup(self) -> str:
        """The engine process warmed up (and proved it) before it accepted this connection."""
        if not self.engine_name:
            raise StreamError(ErrorKind.UNAVAILABLE, "the engine process has not warmed up")
        return self.engine_name

    async def sync(self, timeout_s: float = 10.0) -> None:
        """Return once the engine process has applied everything this frontend sent before
        (streams closed, metrics counted): messages on one connection are applied in order."""
        self._sync_token += 1
        token = self._sync_token
        future = asyncio.get_running_loop().create_future()
        self._syncs[token] = future
        self._send(w.Sync(token))
        try:
            await asyncio.wait_for(future, timeout_s)
        finally:
            self._syncs.pop(token, None)

    def announce_ready(self) -> None:
        self._send(w.Ready(self.name))

    async def stop(self, grace_s: float = 5.0) -> None:
        self._stopping = True
        for state in list(self._streams.values()):
            self._fail(state, ErrorKind.UNAVAILABLE, "server is shutting down")
        if self._out is not None:
            self._out.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)

    # -- what the servicers and metrics read -----------------------------------------------
    def slots_in_use(self) -> int:
        return self._engine_slots

    @property
    def ready_streams(self) -> int:
        return 0  # the ready queue is the engine process's

    def check_admission(self) -> None:
        if self.dead_reason is not None:
            raise StreamError(ErrorKind.UNAVAILABLE, f"the engine failed and serves no more streams: {self.dead_reason}")
        if self._out is None or not self.engine_name:
            raise StreamError(ErrorKind.UNAVAILABLE, "the engine is warming up; retry in a moment")
        if self.draining or self._stopping or self._engine_draining:
            raise StreamError(ErrorKind.UNAVAILABLE, "server is draining for shutdown; retry on another replica")

    def open_stream(self, label: str = "", finalize_at_limit: bool = True,
                    endpointing: EndpointingParams | None = None) -> StreamHandle:
        self.check_admission()
        key = uuid.uuid4().hex[:12]
        facts = self.engine
        state = RemoteStreamState(stream_id=key, slot=-1, label=label, opened_at=time.monotonic(),
                                  finalize_at_limit=finalize_at_limit, endpointing=endpointing,
                                  utterances=UtteranceBook(facts.geometry.encoder_frame_seconds,
                                                           getattr(facts.model_info, "word_boundary", "\u2581")))
        state.audio_room.set()
        state.forward_at = self._forward_point(0)
        state.awaiting_slot = bool(self._rings)  # its audio waits for its ring row (Opened)
        self._add(state)
        # The client's identity (set by the security interceptor when streams per client are
        # limited): the engine process counts them over every frontend.
        self._send(w.Open(key, label, finalize_at_limit, endpointing, CLIENT_IDENTITY.get(), state.awaiting_slot))
        return StreamHandle(self, state)

    # -- per-stream operations -----------------------------------------------------------
    async def push_audio(self, stream: RemoteStreamState, samples: np.ndarray) -> bool:
        if stream.status is not StreamStatus.RECEIVING:
            return False
        if samples.size == 0:
            return True
        if stream.received <= stream.release_to:  # all released so far: this starts a hold
            stream.held_since = time.monotonic()
            self._holding[stream.stream_id] = stream
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep_held(), name="held-audio")
        stream.held.append(np.asarray(samples, dtype=np.float32).tobytes())
        stream.received += samples.size
        if stream.received >= stream.forward_at:
            self._forward_to_boundary(stream)
        return await self._wait_for_audio_room(stream)

    def _forward_point(self, received: int) -> int:
        """The `received` count at which held audio must go: the first chunk boundary past
        `received`, or just past the duration limit if that comes first (the engine process
        cuts the stream there)."""
        g = self.engine.geometry
        return min(g.samples_needed(g.chunks_complete(received)), self._max_samples + 1)

    def _forward_to_boundary(self, stream: RemoteStreamState) -> None:
        """The held audio has completed a chunk: release it up to the last chunk boundary it
        reached and keep the rest held. What goes out then ends where a chunk does, so the
        engine takes each chunk from one write (a message, before the ring: a chunk split over
        two was a copy per row in its event loop). At the duration limit all of it goes."""
        g = self.engine.geometry
        boundary = g.samples_needed(g.chunks_complete(stream.received) - 1)
        keep = stream.received - boundary
        if stream.forward_at > self._max_samples or keep <= 0 or stream.status.terminal:
            self._forward_held(stream)
            return
        # The held audio began at or before the last forward point, a boundary no later than
        # this one, so `keep` is shorter than what is held.
        self._release(stream, boundary)
        stream.held_since = time.monotonic()  # what stays held arrived with the latest packet
        self._holding.pop(stream.stream_id, None)
        self._holding[stream.stream_id] = stream  # to the back: the sweeper's dict stays oldest first
        stream.forward_at = self._forward_point(stream.received)

    def _forward_held(self, stream: RemoteStreamState) -> None:
        """Release all of the stream's held audio."""
        if stream.status.terminal:  # (the engine has let it go)
            self._drop_held(stream)
            return
        self._holding.pop(stream.stream_id, None)
        if stream.received > stream.release_to:
            self._release(stream, stream.received)
            stream.forward_at = self._forward_point(stream.received)

    def _release(self, stream: RemoteStreamState, upto: int) -> None:
        stream.release_to = max(stream.release_to, upto)
        self._deliver(stream)

    def _deliver(self, stream: RemoteStreamState) -> None:
        """The released audio goes out: written into the stream's row of its engine core's ring
        as far as the ring has room (the engine frees it as it consumes; the rows say how far),
        or, without a ring, in one Audio message. Then the End or EndUtterance it was waiting
        for, if any."""
        n = stream.release_to - stream.sent
        if n <= 0 or stream.awaiting_slot:
            return
        ring = stream.ring
        if ring is not None:
            n = min(n, ring.width - (stream.sent - stream.consumed))
            if n <= 0:
                return
        data = self._take_held(stream, n)
        if ring is not None:
            ring.write(stream.slot, stream.sent, np.frombuffer(data, dtype=np.float32))
            self._note_written(stream.core, stream.slot, stream.sent + n)
        else:
            self._send(w.Audio(stream.stream_id, data))
        stream.sent += n
        if stream.after_audio:
            self._send_after_audio(stream)

    @staticmethod
    def _take_held(stream: RemoteStreamState, n: int):
        """The first n held samples (float32 bytes), out of the hold."""
        held = stream.held
        data = held[0] if len(held) == 1 else b"".join(held)
        if len(data) == 4 * n:
            stream.held = []
            return data
        view = memoryview(data)
        stream.held = [view[4 * n:].tobytes()]
        return view[:4 * n]

    def _note_written(self, core: int, slot: int, total: int) -> None:
        """Say it once a loop iteration, for every stream written meanwhile (one Written per core)."""
        self._written.setdefault(core, {})[slot] = total
        self._written_soon.request()

    def _flush_written(self) -> None:
        written, self._written = self._written, {}
        for core, rows in written.items():
            self._send(w.Written(core, w.as_column(list(rows.keys()), w.I64), w.as_column(list(rows.values()), w.I64)))

    def _after_audio(self, stream: RemoteStreamState, message: w.Message) -> None:
        """Send `message` once the audio received so far is delivered (now, unless the ring's
        room or the stream's row is still to come), after the Written that says so."""
        stream.after_audio.append((stream.received, message))
        self._send_after_audio(stream)

    def _send_after_audio(self, stream: RemoteStreamState) -> None:
        while stream.after_audio and stream.after_audio[0][0] <= stream.sent:
            _, message = stream.after_audio.pop(0)
            self._flush_written()
            self._send(message)

    def _drop_held(self, stream: RemoteStreamState) -> None:
        """The engine takes no more of the stream's audio (ended, failed or closed)."""
        stream.held = []
        stream.release_to = stream.sent = stream.received
        stream.after_audio.clear()
        self._holding.pop(stream.stream_id, None)

    async def _sweep_held(self) -> None:
        """Held audio is released once it has waited HOLD_MAX_S; the task ends when none is held."""
        try:
            while self._holding:
                await asyncio.sleep(HOLD_SWEEP_S)
                now = time.monotonic()
                # Oldest hold first; forwarding removes the stream, so the next is again first
                # (no copy of the whole dict every sweep).
                while self._holding:
                    stream = next(iter(self._holding.values()))
                    if now - stream.held_since < HOLD_MAX_S:
                        break
                    self._forward_held(stream)
        finally:
            self._sweeper = None

    def _pending_samples(self, stream: RemoteStreamState) -> int:
        return stream.received - stream.consumed  # consumed arrives with each of the engine's results

    def end_audio(self, stream: RemoteStreamState) -> None:
        if stream.status is not StreamStatus.RECEIVING:
            return
        stream.ended_at = time.monotonic()
        stream.set_status(StreamStatus.FLUSHING)
        self._forward_held(stream)
        self._after_audio(stream, w.End(stream.stream_id))  # the engine's last sample is the client's

    def fail_stream(self, stream: RemoteStreamState, kind: ErrorKind, message: str) -> None:
        self._fail(stream, kind, message)

    def end_utterance(self, stream: RemoteStreamState) -> bool:
        if stream.status is not StreamStatus.RECEIVING:
            return False
        self._forward_held(stream)  # the utterance ends after all the audio sent so far
        stream.final_requested_at = time.monotonic()  # (the engine process may ignore the request)
        self._after_audio(stream, w.EndUtterance(stream.stream_id))
        return True

    def take_event(self, stream: RemoteStreamState) -> StreamEvent | None:
        if not stream.events:
            return None
        event = stream.events.popleft()
        if isinstance(event, StreamFailure) or event.is_final:
            stream.terminal_delivered = True
        if not stream.status.terminal:  # a finished stream needs no more room
            self._ack(stream)
        return event

    def close_stream(self, stream: RemoteStreamState) -> None:
        if not stream.status.terminal:
            stream.set_status(StreamStatus.CANCELLED)
        self._drop_held(stream)
        if self._forget(stream):
            self._flush_written()  # (the engine refuses writes it is told of after the stream's Close)
            self._send(w.Close(stream.stream_id))

    # -- books ---------------------------------------------------------------------------
    def _fail(self, state: RemoteStreamState, kind: ErrorKind, message: str) -> None:
        """A failure decided here: the handler sees it at once; the engine frees the slot."""
        if state.status.terminal:
            return
        self._drop_held(state)
        self._emit(state, StreamFailure(state.stream_id, kind, message))
        state.set_status(StreamStatus.FAILED)
        self._flush_written()  # (as for Close)
        self._send(w.Fail(state.stream_id, kind.value, message))

    def _emit(self, state: RemoteStreamState, event: StreamEvent) -> None:
        state.events.append(event)
        state.peak_events = max(state.peak_events, len(state.events))
        state.events_ready.set()
        state.audio_room.set()  # a push_audio waiting for room re-checks (consumed moved, or the reader is stuck)

    def _ack(self, state: RemoteStreamState) -> None:
        """Tell the engine its events were taken, every half response window rather than per
        event: the engine stops forwarding only at a full window, which it reaches only when
        this frontend holds more than half a window untaken (a client that does not read)."""
        state.unacked += 1
        if state.unacked >= self._ack_every:
            self._send(w.Ack(state.stream_id, state.unacked))
            state.unacked = 0

    def _send(self, message: w.Message) -> None:
        if self._out is not None:
            self._out.send(message)

    # -- the engine's frames -------------------------------------------------------------
    async def _read(self, frames: FrameReader) -> None:
        reason = "the engine process closed its connection"
        try:
            while (batch := await frames.read_frames()) is not None:
                for frame in batch:
                    for message in frame:
                        self._dispatch(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken engine link is an engine death
            reason = f"the connection to the engine process broke: {exc}"
        self.disconnected.set()
        if not self._stopping:
            self._mark_dead(reason)

    def _dispatch(self, m: w.Message) -> None:
        kind = type(m)
        if kind is w.Rows:
            self._rows(m)
        elif kind is w.Failed:
            state = self._streams.get(m.key)
            if state is None or state.status.terminal:
                return  # closed, or failed here first: the engine's word comes too late
            state.consumed = m.consumed
            self._stop_writing(state)
            self._emit(state, StreamFailure(m.key, ErrorKind(m.kind), m.message))
            state.set_status(StreamStatus.FAILED)
        elif kind is w.Opened:
            self._opened(m)
        elif kind is w.Synced:
            future = self._syncs.get(m.id)
            if future is not None and not future.done():
                future.set_result(None)
        elif kind is w.Cut:
            state = self._streams.get(m.key)
            if state is not None and not state.status.terminal:
                # The engine cut the audio at a limit: that is the stream's end reason even when
                # the client's own end reached this frontend first (the client sent past the
                # limit), as in an in-process scheduler, which cuts when the audio arrives.
                state.end_reason = m.end_reason or None
                if state.status is StreamStatus.RECEIVING:
                    self._stop_writing(state)  # the engine takes no more of its audio
                    state.ended_at = time.monotonic()
                    state.set_status(StreamStatus.FLUSHING)
        elif kind is w.State:
            self.engine_name, self.executions = m.engine_name or self.engine_name, m.executions
            self.max_batch, self._engine_slots, self._engine_draining = m.max_batch, m.slots_in_use, m.draining
            if m.dead_reason is not None:
                self._mark_dead(m.dead_reason)
        elif kind is w.Error:  # the engine host is closing this link, and says why
            raise w.WireError(f"the engine process refused this frontend's link: {m.message}")
        else:
            raise w.WireError(f"unexpected message {kind.__name__} from the engine process")

    def _opened(self, m: w.Opened) -> None:
        """The stream's row in its engine core's ring: its released audio goes there now."""
        if not 0 <= m.core < len(self._rings) or not 0 <= m.slot < self._rings[m.core].slots:
            raise w.WireError(f"Opened names row {m.slot} of ring {m.core}, which this frontend does not have")
        state = self._streams.get(m.key)
        if state is None or not state.awaiting_slot:
            return  # closed meanwhile (the engine has its Close)
        state.awaiting_slot = False
        state.ring, state.core, state.slot = self._rings[m.core], m.core, m.slot
        self._deliver(state)

    def _stop_writing(self, state: RemoteStreamState) -> None:
        """The engine ended or failed the stream: no more of its audio goes out, and a stream
        that writes into a ring says so (its slot may then go back to the engine's pool)."""
        self._drop_held(state)
        if state.ring is not None or state.awaiting_slot:
            state.ring, state.awaiting_slot = None, False
            self._flush_written()  # what it wrote is said before it stops
            self._send(w.Stopped(state.stream_id))

    def _rows(self, m: w.Rows) -> None:
        """A step's answered chunks of this frontend's streams: each stream's utterances and text
        move on, and its event goes to its handler."""
        streams, emit, c = self._streams, self._emit, m.columns
        ids, pieces, frames, starts, ends = c.ids, c.pieces, c.frames, c.starts, c.ends
        a = 0
        for i, (key, consumed, k, seconds, ready, is_final, final_due, b, text) in enumerate(zip(
                m.keys, c.consumed, c.chunk, c.audio_seconds, c.ready_at, c.is_final, c.final_due, c.tok_end, c.text)):
            state = streams.get(key)
            if state is None or state.status.terminal:
                a = b
                continue  # closed, or failed here first: the engine's word comes too late
            state.consumed = consumed
            if state.release_to > state.sent:  # audio that waited for room in the ring
                self._deliver(state)
            event = chunk_event(key, state.utterances, k, ready, seconds, ids[a:b], pieces[a:b], frames[a:b], text,
                                starts.get(i, ()), ends.get(i, ()), is_final, final_due)
            a = b
            if event.finals:
                self._finals_done(state, event)
            if is_final and state.status is StreamStatus.RECEIVING:
                state.set_status(StreamStatus.FLUSHING)  # the engine ended it (a duration limit)
            emit(state, event)
            if is_final:
                state.set_status(StreamStatus.FINISHED)

    def _finals_done(self, state: RemoteStreamState, event) -> None:
        """The engine host counts finals' latencies: from the audio that closed an utterance, or
        from the client's request here."""
        now = time.monotonic()
        for u in event.finals:
            self._send(w.UtteranceFinal(u.closed_by.value, final_latency(u, state.final_requested_at,
                                                                         event.audio_ready_at, now)))

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        log.critical("engine marked dead", extra={"reason": reason})
        for state in list(self._streams.values()):
            self._drop_held(state)
            if not state.status.terminal:
                self._emit(state, StreamFailure(state.stream_id, ErrorKind.UNAVAILABLE, f"the engine failed: {reason}"))
                state.set_status(StreamStatus.FAILED)
        self.observer.engine_dead(reason)


class RemoteMetrics(ServerMetrics):
    """A frontend's metrics: its transport counts go to the engine process, whose endpoint
    serves the whole server's figures (the frontend serves none of its own)."""

    def __init__(self, scheduler: RemoteScheduler, max_batch: int = 32):
        super().__init__(max_batch=max_batch)
        self._remote = scheduler
        self.audio_seconds = _ForwardedCounter(scheduler)
        # The GC callback and the responses written only record (server.ops.metrics._GcPauseTimer,
        # BulkHistogram.observe); this task forwards both.
        self._forward_task = asyncio.get_running_loop().create_task(self._forward_metrics(), name="metrics-forward")

    async def _forward_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_FORWARD_PERIOD_S)
            self.flush_gc()
            self.flush_chunks_written()

    def flush_chunks_written(self) -> None:
        """This frontend's written-chunk latencies since the last flush, to the engine process."""
        counts, total = self.chunk_written.take_counts()
        if counts.any():
            self._remote._send(w.ChunksWritten(counts.tobytes(), total))

    def close(self) -> None:
        self._forward_task.cancel()
        self.flush_gc()
        self.flush_chunks_written()
        self.audio_seconds.flush()
        super().close()

    def rpc_finished(self, method: str, code: str) -> None:
        # The call's audio is counted before its end: whoever sees the RPC counted sees its audio.
        self.audio_seconds.flush()
        self._remote._send(w.Rpc(method, code))

    def call_refused(self, reason: str) -> None:
        self._remote._send(w.Refused(reason))

    def gc_paused(self, generation: str, seconds: float, process: str | None = None) -> None:
        self._remote._send(w.Gc(generation, seconds))  # on the loop, from flush_gc


class _ForwardedCounter:
    """`.inc()` like a prometheus Counter; the sum goes out AUDIO_SECONDS_PERIOD_S after the
    first increment since the last message, and at once before an RPC's end is counted (so a
    finished call's audio is counted before the call). Once per loop iteration it was a sixth of
    the messages the engine process read (bench/RESULTS.md, the frontends' frames)."""

    def __init__(self, scheduler: RemoteScheduler):
        self._remote = scheduler
        self._pending = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def inc(self, amount: float = 1.0) -> None:
        if amount <= 0:
            return
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(AUDIO_SECONDS_PERIOD_S, self.flush)
        self._pending += amount

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        amount, self._pending = self._pending, 0.0
        if amount:
            self._remote._send(w.AudioSeconds(amount))

"""The asyncio micro-batching scheduler: keeps the books of every stream, feeds the engine.

Pure Python: it talks to the engine only through engines.api (typed plans in, typed results
out) and to the transport only through server.scheduling.stream_events. No gRPC, no torch.

How a chunk travels:
  push_audio -> the stream's row of the sample ring (engines.sample_ring; what does not fit
  waits in the stream's SampleQueue until a step frees room) -> (its row in the slot books says
  the next chunk is complete) -> ready set (FCFS, one row per stream) -> the batching task takes
  up to max_batch rows, oldest first, once the batch is full or `batch_wait_s` after the oldest
  entry (server.scheduling.step_batch.form_batch: array operations over
  server.scheduling.slot_books; the audio stays in the ring, the plan names its spans) -> one
  columnar StepPlan runs on the single engine thread (or, for an engine in a worker
  process, is sent to it from the loop: server.runtime.engine_worker), failures isolated
  (server.scheduling.step_batch.run_isolated; the batching task and the steps' round trip:
  server.scheduling.step_loop) -> the StepResult is checked against the plan and
  scattered back (server.scheduling.step_results) as ChunkResult events, or, to a listener that
  makes the events itself, as ChunkRows columns (server.runtime.engine_host, whose frontend
  processes keep the streams' text) -> rows whose next chunk is complete rejoin the ready set.

A stream is in at most one submitted step (its row's `in_flight` flag), so its chunks run in order.
Up to `pipeline_depth` steps may be submitted at once: a full batch is queued behind the running
step so the engine thread never waits for the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engines.api import EndpointingParams, EngineError, StepTimings, StreamingEngine
from server.scheduling.audio_intake import AudioIntake
from server.scheduling.loop_calls import call_soon_from_thread
from server.scheduling.slot_books import SlotBooks, SlotStream
from server.scheduling.step_loop import StepLoop
from server.scheduling.step_results import StepResults
from server.scheduling.stream_books import StreamBooks, StreamScheduler
from server.scheduling.stream_events import (ChunkRows, ErrorKind, StreamError, StreamEvent, StreamFailure,
                                             UtteranceEnd)
from server.scheduling.stream_state import StreamState, StreamStatus
from server.scheduling.utterances import UtteranceBook

log = logging.getLogger("nemostream.scheduler")


@dataclass(frozen=True)
class SchedulerConfig:
    batch_wait_s: float = 0.005       # deadline from the oldest ready chunk to fill a batch
    # ... kept only when at least this many chunks are expected meanwhile (the recent rate of
    # chunks into steps x batch_wait_s); at lower load a partial batch goes at once
    # (server/scheduling/arrival_rate.py). 0: always wait.
    wait_min_arrivals: float = 1.0
    pipeline_depth: int = 2           # steps submitted to the engine thread at once
    # With a step running in an engine worker (an engine with step_async), the next step goes
    # behind it once it has run this share of the recent steps' time, full or not: the worker
    # prepares it while the device runs the first, and queues its device work the moment the
    # first's is done (server.runtime.worker_process). Chunks that come later wait for the step
    # after. >= 1: only a full batch goes behind a running step (the earlier policy, under which
    # 1% of steps were prepared ahead on the H200, run 24).
    overlap_at: float = 0.6
    response_buffer: int = 32         # undelivered results per stream before it stops being scheduled
    # Unprocessed audio per stream before push_audio waits (backpressure); a stream whose client
    # also leaves response_buffer results unread past it fails with RESOURCE_EXHAUSTED.
    max_pending_seconds: float = 30.0
    max_stream_seconds: float = 3600.0  # of audio, and of wall time since the stream opened
    stall_timeout_s: float = 60.0     # push_audio waiting this long for room fails the stream
    dead_after_failures: int = 3      # consecutive failed steps that mark the engine dead
    # A hung engine: with a step submitted, no step finished within max(hang_timeout_s,
    # hang_step_factor x the slowest recent step) marks the engine dead (0: never).
    hang_timeout_s: float = 20.0
    hang_step_factor: float = 50.0

    def __post_init__(self) -> None:
        if self.batch_wait_s < 0:
            raise ValueError("batch_wait_s must be >= 0")
        if self.pipeline_depth < 1:
            raise ValueError("pipeline_depth must be >= 1")
        if self.overlap_at < 0:
            raise ValueError("overlap_at must be >= 0")
        if self.wait_min_arrivals < 0:
            raise ValueError("wait_min_arrivals must be >= 0")
        if self.response_buffer < 1:
            raise ValueError("response_buffer must be >= 1")
        if self.max_pending_seconds <= 0 or self.max_stream_seconds <= 0 or self.stall_timeout_s <= 0:
            raise ValueError("max_pending_seconds, max_stream_seconds and stall_timeout_s must be > 0")
        if self.dead_after_failures < 1:
            raise ValueError("dead_after_failures must be >= 1")
        if self.hang_timeout_s < 0 or self.hang_step_factor < 0:
            raise ValueError("hang_timeout_s and hang_step_factor must be >= 0")

    # The bounds in samples, for the scheduler and for a frontend's view of it alike
    # (server.runtime.remote_scheduler), so the two cannot drift apart.
    def max_pending_samples(self, geometry) -> int:
        """Unprocessed audio per stream before push_audio waits. Never below what one chunk
        needs, or a stream could wait for room that never comes."""
        return max(int(self.max_pending_seconds * geometry.sample_rate), 2 * geometry.segment_samples)

    def max_stream_samples(self, geometry) -> int:
        """The most audio a stream takes (max_stream_seconds at the model's rate)."""
        return int(self.max_stream_seconds * geometry.sample_rate)


class SchedulerObserver:
    """Hooks for metrics; every method is called on the event loop. No-ops by default."""

    # `timings`: the engine's own account of the step (engines.api.StepTimings); step_seconds is
    # the scheduler's, which also holds the way there and back (server.runtime.engine_worker: a pipe).
    # queue_waits and latencies: one value per chunk of the step (sequences of seconds), so a
    # metric takes a step's chunks at once rather than a call per chunk.
    def step_done(self, batch_size: int, step_seconds: float, queue_waits: Sequence[float],
                  engine: str, executions: dict[str, int], timings: StepTimings | None = None) -> None: ...
    def chunks_answered(self, latencies_seconds: Sequence[float]) -> None: ...
    # An utterance's final went out: what closed it, and the seconds from the audio (or, for
    # the client's request, the request) that made it due to the final.
    def utterance_final(self, closed_by: UtteranceEnd, latency_seconds: float) -> None: ...
    def engine_dead(self, reason: str) -> None: ...
    # A step attempt that raised, by what the scheduler did about it: "retry" (the same batch
    # again), "split" (halves), "overloaded" (out of memory: halves and a lower max batch),
    # "isolated" (one stream failed alone), "lost" (state lost in the commit).
    def step_fault(self, kind: str) -> None: ...
    def max_batch_lowered(self, max_batch: int) -> None: ...


class StreamListener:
    """Hooks for a consumer that relays streams elsewhere (server.runtime.engine_host, which serves
    frontend processes): told when a stream has events to take, and when the scheduler itself
    ended a stream's audio (a duration limit). Called on the event loop. No-ops by default.

    A listener with `wants_rows` makes the streams' chunk events itself: it gets every answered
    chunk as ChunkRows columns (`chunk_rows`), and only failures as events. The scheduler then
    keeps no text: its streams' utterance books stay empty, and each row handed over counts as
    an event unread until the listener's `Scheduler.acknowledge`."""

    wants_rows = False

    def events_added(self, stream: StreamState) -> None: ...
    def audio_cut(self, stream: StreamState) -> None: ...
    def chunk_rows(self, rows: ChunkRows) -> None: ...


class StreamHandle:
    """What the transport holds for one open stream, on any StreamScheduler (this module's
    Scheduler, a frontend's RemoteScheduler, EngineCores): the same six operations."""

    def __init__(self, scheduler: StreamScheduler, state: StreamState):
        self._scheduler = scheduler
        self.state = state

    @property
    def stream_id(self) -> str:
        return self.state.stream_id

    async def push_audio(self, samples: np.ndarray) -> bool:
        return await self._scheduler.push_audio(self.state, samples)

    def end_audio(self) -> None:
        self._scheduler.end_audio(self.state)

    def fail(self, kind: ErrorKind, message: str) -> None:
        self._scheduler.fail_stream(self.state, kind, message)

    def end_utterance(self) -> bool:
        return self._scheduler.end_utterance(self.state)

    async def next_event(self) -> StreamEvent | None:
        return await self._scheduler.next_event(self.state)

    def close(self) -> None:
        self._scheduler.close_stream(self.state)

    def __aiter__(self):
        return self

    async def __anext__(self) -> StreamEvent:
        event = await self.next_event()
        if event is None:
            raise StopAsyncIteration
        return event


class Scheduler(AudioIntake, StepLoop, StepResults, StreamBooks):
    def __init__(self, engine: StreamingEngine, config: SchedulerConfig | None = None,
                 observer: SchedulerObserver | None = None):
        super().__init__()
        self.engine = engine
        self.config = config or SchedulerConfig()
        self.observer = observer or SchedulerObserver()
        self.listener = StreamListener()
        self.geometry = engine.geometry
        self.max_batch = max(1, int(engine.max_batch))
        self._max_pending = self.config.max_pending_samples(self.geometry)
        self._max_samples = self.config.max_stream_samples(self.geometry)
        # Per slot: position, ready set (with queue order and time), in flight, flags.
        self._books = SlotBooks(self.geometry, int(getattr(engine, "capacity", 0) or 1))
        self._init_audio(engine)  # each slot's audio: the sample ring, and the frontends' counts
        self._wakeup = asyncio.Event()
        self._init_step_loop(engine)  # the batching task's state, the step pipeline, the hang clock
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        self._hang_task: asyncio.Task | None = None
        self.engine_name: str | None = None     # what the warm-up really executed
        # Which engine this is in messages to clients, when there are several (server.runtime.engine_cores).
        self.label = ""
        self.executions: dict[str, int] = {}    # last snapshot of engine.executions()

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        # One dedicated thread: engine steps are not thread-safe (NeMo mutates streaming_cfg),
        # and the event loop must keep reading and writing while the engine computes.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        loop = asyncio.get_running_loop()
        self._loop_task = loop.create_task(self._batch_loop(), name="batch-loop")
        self._loop_task.add_done_callback(self._loop_exited)
        if self.config.hang_timeout_s > 0:
            self._hang_task = loop.create_task(self._watch_for_hangs(), name="hang-watch")
        # An engine that can die on its own (server.runtime.engine_worker: its process exits) says so at
        # once, so health turns NOT_SERVING without waiting for a step to fail.
        watch = getattr(self.engine, "watch", None)
        if callable(watch):
            watch(lambda reason: call_soon_from_thread(loop, self._mark_dead, reason))

    async def warmup(self) -> str:
        """Run the engine's warm-up on the engine thread; prove its execution counter moved."""
        def run() -> tuple[str, dict[str, int], dict[str, int]]:
            before = dict(self.engine.executions())
            name = self.engine.warmup()
            return name, before, dict(self.engine.executions())

        name, before, after = await asyncio.get_running_loop().run_in_executor(self._executor, run)
        if after.get(name, 0) <= before.get(name, 0):
            raise EngineError(f"warm-up claims engine {name!r} but its execution counter did not move "
                              f"(before {before}, after {after})")
        self.engine_name, self.executions = name, after
        return name

    async def stop(self, grace_s: float = 5.0) -> None:
        """Fail what is still open, let submitted steps finish (up to grace_s), stop the thread."""
        self._stopping = True
        for stream in list(self._streams.values()):
            self._fail(stream, ErrorKind.UNAVAILABLE, "server is shutting down")
        if self._hang_task is not None:
            self._hang_task.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._step_tasks:
            await asyncio.wait(list(self._step_tasks), timeout=grace_s)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._own_ring:
            self._ring.close()

    # -- admission -----------------------------------------------------------------------
    def slots_in_use(self) -> int:
        return self.engine.slots_in_use()

    @property
    def ready_streams(self) -> int:
        """Streams whose next chunk waits in the ready queue."""
        return self._books.ready_count

    def check_admission(self) -> None:
        """Raise StreamError when a new stream would be refused (cheap; no slot taken)."""
        if self.dead_reason is not None:
            raise StreamError(ErrorKind.UNAVAILABLE,
                              f"the engine{self._of_label} failed and serves no more streams: {self.dead_reason}")
        if self.engine_name is None:
            raise StreamError(ErrorKind.UNAVAILABLE, "the engine is warming up; retry in a moment")
        if self.draining or self._stopping:
            raise StreamError(ErrorKind.UNAVAILABLE, "server is draining for shutdown; retry on another replica")
        if len(self._streams) >= self.engine.capacity:
            raise StreamError(ErrorKind.RESOURCE_EXHAUSTED,
                              f"all {self.engine.capacity} stream slots are in use; retry later")

    def open_stream(self, label: str = "", finalize_at_limit: bool = True, stream_id: str | None = None,
                    endpointing: EndpointingParams | None = None) -> StreamHandle:
        """A new stream, holding a slot. At max_stream_seconds (of audio, or of wall time) a
        stream with `finalize_at_limit` is ended there and gets its final result (a client
        that never half-closes); one without fails with OUT_OF_RANGE (a whole file that is too
        long). `stream_id`: the caller's own unique id (a frontend process names its streams).
        `endpointing`: how the engine splits the stream into utterances (None: one utterance)."""
        self.check_admission()
        if stream_id is not None and stream_id in self._streams:
            raise StreamError(ErrorKind.INTERNAL, f"stream id {stream_id} is already open")
        try:
            slot = self.engine.acquire_slot()
        except EngineError as exc:  # PoolExhaustedError: slots of leaving streams still in a step
            raise StreamError(ErrorKind.RESOURCE_EXHAUSTED,
                              f"all {self.engine.capacity} stream slots are in use; retry later ({exc})") from exc
        if slot >= self._ring.slots:
            self.engine.release_slot(slot)
            raise StreamError(ErrorKind.INTERNAL, f"slot {slot} is past the sample ring's {self._ring.slots} rows")
        stream_id = stream_id or f"{uuid.uuid4().hex[:12]}"
        info = self.engine.model_info
        try:
            state = SlotStream(self._books, stream_id=stream_id, slot=slot, label=label, opened_at=time.monotonic(),
                               finalize_at_limit=finalize_at_limit, endpointing=endpointing,
                               utterances=UtteranceBook(self.geometry.encoder_frame_seconds,
                                                        getattr(info, "word_boundary", "\u2581")))
        except Exception:
            self.engine.release_slot(slot)
            raise
        state.audio_room.set()
        state.time_limit = asyncio.get_running_loop().call_later(
            self.config.max_stream_seconds, self._time_limit_reached, state)
        self._add(state)
        return StreamHandle(self, state)

    # -- per-stream operations (event loop; the audio's: server.scheduling.audio_intake) ---
    def _end_at_limit(self, stream: StreamState, what: str) -> None:
        log.info("stream reached its maximum duration; finalizing", extra={"stream_id": stream.stream_id, "limit": what})
        stream.end_reason = f"the stream reached the maximum duration of {what}"
        self.end_audio(stream)
        self.listener.audio_cut(stream)

    def _time_limit_reached(self, stream: StreamState) -> None:
        if stream.status is not StreamStatus.RECEIVING:
            return
        if stream.finalize_at_limit:
            self._end_at_limit(stream, f"{self.config.max_stream_seconds:g} s since it opened")
        else:
            self._fail(stream, ErrorKind.OUT_OF_RANGE,
                       f"stream exceeds the maximum duration of {self.config.max_stream_seconds:g} s")

    def end_audio(self, stream: StreamState) -> None:
        self.book_written()  # the stream's last counts first
        if stream.status is not StreamStatus.RECEIVING:
            return
        stream.ended_at = time.monotonic()
        stream.set_status(StreamStatus.FLUSHING)
        self._maybe_enqueue(stream)

    def fail_stream(self, stream: StreamState, kind: ErrorKind, message: str) -> None:
        self._fail(stream, kind, message)

    def end_utterance(self, stream: StreamState) -> bool:
        """The client says its speaker stopped (its own turn detector): the open utterance gets
        its final once the chunks whose audio is complete now have run, at once when none is
        pending. Audio short of a whole chunk waits for the next utterance (it cannot run
        alone without breaking the caches). False when the request was ignored: the stream
        takes no more audio (its end will close the utterance) or its client leaves a full
        response window unread."""
        self.book_written()  # the chunks complete now include the counts kept
        if stream.status is not StreamStatus.RECEIVING or self._unread(stream) >= self.config.response_buffer:
            return False
        target = stream.next_chunk
        while self.geometry.chunk_span(target, stream.received, False) is not None:
            target += 1
        stream.final_requested_at = time.monotonic()
        if target > stream.next_chunk or stream.in_flight:
            stream.final_due_after = max(target, stream.final_due_after or 0)
            return True
        stream.final_due_after = None
        stream.new_utterance_next = True
        self._answer_without_step(stream, stream.audio_seconds, stream.final_requested_at, is_final=False,
                                  final_due=True)
        return True

    def _unread(self, stream: StreamState) -> int:
        """Events of the stream not taken yet: in its buffer here, or handed to a listener that
        makes the events and not acknowledged by it."""
        unread = len(stream.events)
        if not stream.slot_released:
            unread += self._books.unread.item(stream.slot)
        return unread

    def acknowledge(self, stream: StreamState, n: int) -> None:
        """A listener that makes the events (`wants_rows`) took n of the stream's rows: room in
        its response window lets the stream be scheduled again."""
        if stream.slot_released or n <= 0:
            return
        books, slot = self._books, stream.slot
        was_full = self._unread(stream) >= self.config.response_buffer
        books.unread[slot] = max(0, int(books.unread[slot]) - n)
        if was_full:
            self._maybe_enqueue(stream)

    def take_event(self, stream: StreamState) -> StreamEvent | None:
        """The next undelivered event, or None when there is none now (next_event waits)."""
        if not stream.events:
            return None
        was_full = len(stream.events) >= self.config.response_buffer
        event = stream.events.popleft()
        if isinstance(event, StreamFailure) or event.is_final:
            stream.terminal_delivered = True
        if was_full:  # room in the response buffer unblocks the stream (nothing else here can)
            self._maybe_enqueue(stream)
        return event

    def close_stream(self, stream: StreamState) -> None:
        """The consumer left (normally, by error, or cancelled): drop the stream at once; its
        slot is freed now, or when the step it is in returns."""
        if not stream.status.terminal:
            stream.set_status(StreamStatus.CANCELLED)
        if stream.time_limit is not None:
            stream.time_limit.cancel()
            stream.time_limit = None
        self._release_slot(stream)
        self._forget(stream)

    # -- books ---------------------------------------------------------------------------
    def _emit(self, stream: StreamState, event: StreamEvent) -> None:
        stream.events.append(event)
        stream.peak_events = max(stream.peak_events, len(stream.events))
        stream.events_ready.set()
        self.listener.events_added(stream)
        if len(stream.events) >= self.config.response_buffer:
            stream.audio_room.set()  # a push_audio waiting for room re-checks: the reader may be stuck

    def _fail(self, stream: StreamState, kind: ErrorKind, message: str) -> None:
        if stream.status.terminal:
            return
        self._emit(stream, StreamFailure(stream.stream_id, kind, message))
        stream.set_status(StreamStatus.FAILED)  # leaves the ready set (SlotStream.set_status)
        self._release_slot(stream)
        log.info("stream failed", extra={"stream_id": stream.stream_id, "code": kind.value, "reason": message})

    def _release_slot(self, stream: StreamState) -> None:
        # A slot in a submitted step is still the engine's to write: free it when the step returns.
        if stream.slot_released or stream.in_flight or not stream.status.terminal or stream.writer_attached:
            return
        self.book_written()  # counts kept for this slot apply to this stream, not the next one
        stream.slot_released = True
        self._books.free(stream.slot)  # the row is cleared; the stream keeps its numbers
        try:
            self.engine.release_slot(stream.slot)
        except Exception:  # noqa: BLE001 - a bad release must not take the loop down
            log.exception("release_slot failed", extra={"stream_id": stream.stream_id, "slot": stream.slot})

    def _maybe_enqueue(self, stream: StreamState, now: float | None = None) -> None:
        """Put the stream in the ready set if its next chunk is complete and it may run."""
        books, slot = self._books, stream.slot
        if (stream.slot_released or not books.live[slot] or books.in_flight[slot] or books.queued[slot]
                or self._unread(stream) >= self.config.response_buffer):
            return
        if books.spilled.item(slot):
            self._drain_spill(stream)
        spilled = books.spilled.item(slot)
        in_ring = books.received.item(slot) - spilled
        if books.flushing[slot]:
            # Ended: its last chunks run to the end of its audio, once all of it is in the ring
            # (until then the ring is full, so the next chunk is a whole one).
            k, ended = int(books.next_chunk[slot]), spilled == 0
            if self.geometry.chunk_span(k, in_ring, ended) is None:
                if self.geometry.finished(k, in_ring, ended):
                    self._finish_without_step(stream)
                return
        elif in_ring < books.due.item(slot):
            return
        books.queue(slot, now or time.monotonic())
        # Wake the batching task only when this entry can change its decision: the first entry
        # starts the deadline, a full queue is due at once. Waking it for every chunk cost a loop
        # iteration per chunk (bench/host_overhead.py).
        n = books.ready_count
        if n == 1 or n >= self.max_batch:
            self._wakeup.set()

    def _finish_without_step(self, stream: StreamState) -> None:
        """Every frame is decoded but the engine has not said final: the stream ended on a
        chunk boundary after its last chunk ran, or holds less than one frame of audio."""
        ready_at = stream.ended_at or time.monotonic()
        self._answer_without_step(stream, stream.received / self.geometry.sample_rate, ready_at, is_final=True,
                                  final_due=False)
        stream.set_status(StreamStatus.FINISHED)
        self._release_slot(stream)

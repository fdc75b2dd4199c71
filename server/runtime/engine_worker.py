"""The engine in a worker process of its own, so that the engine and the scheduler's event loop do not
share one interpreter lock.

Why: an engine step is a few dozen short GPU launches with Python between them; while the event
loop holds the lock (the per-chunk books, gRPC or the frontends' wire), the GPU runs dry. On an
H100 a pure-Python thread busy 45% of the time beside the engine thread stretched a step of 128
streams from 13.3 to 17.2 ms, and at 70% to 21.0 ms (bench/shared_gpu_step.py --gil-loads,
bench/RESULTS.md); the server's event loop at 1,000 streams is such a thread. In its own
process the engine thread runs alone.

Parent side: `EngineWorker`, a StreamingEngine whose step is a round trip over the typed wire
(server.runtime.wire, on a socket pair). The scheduler awaits it on its event loop (`step_async`); `step`
blocks instead, for callers without a loop. Slots are allocated here, where the books are, and
each acquire and release is sent ahead of any step that uses the slot; the child maps them onto
slots of its own engine, whose own checks still apply. Requests that get a reply carry an id,
and replies are matched by it.

A step crosses the link as columns: the step message carries the plan's columns (stream ids,
and slots, sample offsets and flags as numpy arrays in bytes), the child builds its plan with
StepPlan.from_columns, and the reply carries the result's ResultColumns the same way, which the
parent turns into a StepResult with StepResult.from_columns. So neither side builds a Python
object per row for rows that carry only progress (with a message per row, the ChunkWork, Row
and StreamUpdate of each row cost about 9-11 µs a row for a step and its reply; the columns
cost under 0.6, bench/RESULTS.md). A step's audio does not go through the link. The
scheduler keeps each slot's audio in a sample ring (engines.sample_ring) that this class
creates in shared memory and the child maps (`AttachRing`): a step names each row's span of
it, and the child gathers the spans into one array (RowSamples) while the device runs the step
before, so the parent copies no audio at all. A plan whose audio is not in the ring (a caller
other than the scheduler) is copied into a buffer both processes map (`_SampleBuffer`), the
rows one after another at the message's offsets. When
the audio went through the link, the 1-5 MB of a large step went in socket-buffer-sized
writes, and between writes the engine thread waited for the interpreter lock the event loop held:
on an H100 at 1,920 streams (560 ms) the scheduler waited 44.9 ms for steps that took 23.2 ms
inside the engine (asr_step_seconds against asr_engine_step_seconds, bench/RESULTS.md). There
are two buffers: the scheduler keeps two steps submitted, and `step_async` sends both, so the
worker starts the second the moment it has replied to the first.

Child side: `_child_main` reads `Configure` (the engine factory, as `asr-server
--engine-factory` names it, the EngineConfig and the logging and GC options), builds the engine,
sends the `Hello` handshake, then answers requests in order until the link closes. A frame it
cannot read closes the link (logged), and the child exits. It ignores SIGINT and SIGTERM: the
parent decides when it stops (a Ctrl-C reaches the whole process group, and the parent's drain
still needs it).

With two steps in flight the child overlaps them (`_ReadAhead`, `_start`, `_finish`): while the
device runs step n (StreamingEngine.start_step, a StepRun at QUEUED) it reads step n+1 if it
has arrived and prepares it (checks, waveform windows), and queues step n+1's device work from
the stage the engine names (`next_at`): on a GPU, where the engine decodes on a CUDA stream of
its own, at once, so that n+1's features, gather and encoder run while step n decodes and
commits (a step that arrives during that decode is taken and queued before n's results);
otherwise once step n's decode and commit are queued (DEVICE_DONE). Then it does step n's host
part (waveform history, counters, results, the reply) while the device computes n+1.
The two steps never share a stream (the scheduler submits a stream in one step at a time), so
each stream's work keeps its order, and the replies keep the requests' order.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import dataclasses
import contextlib
import logging
import mmap
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engines.api import (DEVICE_DONE, QUEUED, BadChunkError, EngineError, EngineOverloadedError, EngineState,
                         PoolExhaustedError, ResultColumns, RowSamples, StepPlan, StepResult, StreamStateLostError)
from engines.config import EngineConfig
from engines.sample_ring import RingSamples, SampleRing, ring_width
from engines.slot_allocator import SlotAllocator
from server.runtime import wire as w
from server.scheduling.loop_calls import call_soon_from_thread

log = logging.getLogger("nemostream.engine_worker")
_DIRECT_SEND_BYTES = 16 << 10  # larger frames (a step with its audio inline) go by the writer thread
STEPS_IN_FLIGHT = 2  # asynchronous steps sent at once (the scheduler's pipeline depth is 2)
PROCESS_NAME = "asr-engine"  # what ps shows for the child


@dataclass(frozen=True)
class ChildOptions:
    """How the child sets itself up: logging as the parent's, and the garbage collector's
    policy after warm-up (server.runtime.gc_policy), since the child allocates per step too."""

    log_level: str = "INFO"
    log_format: str = "text"
    gc_freeze: bool = True
    gc_threshold: tuple[int, int, int] | None = None


class _SampleBuffer:
    """float32 samples in a file both processes map (in /dev/shm where there is one). The parent
    creates it and unlinks the name once the child has mapped it; the mappings stay."""

    def __init__(self, path: str, samples: int):
        self.path = path
        self.samples = samples
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), samples * 4)
        self.array = np.frombuffer(self._map, dtype=np.float32)

    @classmethod
    def create(cls, samples: int) -> _SampleBuffer:
        fd, path = tempfile.mkstemp(prefix="asr-engine-audio-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        try:
            os.ftruncate(fd, samples * 4)
        finally:
            os.close(fd)
        return cls(path, samples)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _Link:
    """The blocking side of the worker link: frames from a socket, decoded (server.runtime.wire)."""

    def __init__(self, sock: socket.socket, kinds):
        self.sock = sock
        self._frames = w.FrameSplitter()
        self.decoder = w.Decoder(kinds)
        self._ready: collections.deque = collections.deque()

    def read_frames(self, take=bytes) -> list | None:
        """`take` of each of the next complete frames' bodies (at least one; `bytes`: a copy to
        hand on), or None at the end of the link. The socket is read straight into the
        splitter's reused buffer."""
        while True:
            n = self.sock.recv_into(self._frames.room())
            if not n:
                self._frames.check_end()
                return None
            self._frames.filled(n)
            frames = self._frames.split(take)
            if frames:
                return frames

    def read(self):
        """The next message, or None at the end of the link."""
        while not self._ready:
            frames = self.read_frames(self.decoder.decode)
            if frames is None:
                return None
            for messages in frames:
                self._ready.extend(messages)
        return self._ready.popleft()

    def poll(self):
        """The next message if a whole one has arrived, else NOTHING, without waiting; None at
        the end of the link."""
        if self._ready:
            return self._ready.popleft()
        try:
            n = self.sock.recv_into(self._frames.room(), 0, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return NOTHING
        if not n:
            self._frames.check_end()
            return None
        self._frames.filled(n)
        for messages in self._frames.split(self.decoder.decode):
            self._ready.extend(messages)
        return self._ready.popleft() if self._ready else NOTHING

    def wait_readable(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for bytes to arrive (returns at once with a message decoded)."""
        if not self._ready:
            select.select([self.sock], [], [], timeout)

    def send(self, message: w.Message) -> None:
        self.sock.sendall(w.encode_frame([message]))


NOTHING = object()  # _Link.poll: no whole message has arrived yet


class _Pending:
    """A step sent and not yet answered. Its reply (or the link's end) resolves `result`, which
    the sender awaits directly, and then runs `on_arrival` (set by a sender that was cancelled
    meanwhile: its buffer is the worker's until then). Why not asyncio.shield: its inner future
    resolves the outer one in a callback of its own, a whole turn of a busy event loop (1-3 ms on
    the H200 host) between the reply and the scheduler, on every step."""

    __slots__ = ("result", "arrived", "on_arrival")

    def __init__(self, result: asyncio.Future):
        self.result = result
        self.arrived = False
        self.on_arrival: Callable[[], None] | None = None

    def arrive(self, value: object) -> None:
        """The reply's value, or the exception to raise in the sender."""
        self.arrived = True
        if not self.result.done():  # a cancelled sender's future is done already
            if isinstance(value, BaseException):
                self.result.set_exception(value)
            else:
                self.result.set_result(value)
        if self.on_arrival is not None:
            self.on_arrival()


def _pack_step(plan: StepPlan, buffer: _SampleBuffer | None, index: int, request: int,
               ring: SampleRing | None = None) -> w.Step:
    """The message for a step: the plan's columns as they are, and its audio as spans of the
    sample ring both processes map (`ring`), or else copied into the shared buffer (or inline
    when the buffer is missing or too small), the rows one after another."""
    samples = plan.samples
    flags = plan.first.astype(w.U8)
    flags |= plan.audio_ended.astype(w.U8) << 1
    flags |= plan.new_utterance.astype(w.U8) << 2
    if (ring is not None and isinstance(samples, RingSamples) and samples.ring is ring
            and np.array_equal(samples.slots, plan.slots)):
        spans = np.stack((samples.starts, samples.ends), axis=1).astype(w.I64, copy=False)
        return w.Step(request, -1, list(plan.stream_ids), w.as_column(plan.slots, w.I64), b"", flags.tobytes(),
                      plan.endpointing, None, spans.tobytes())
    n = len(samples)
    offsets = np.zeros(n + 1, dtype=w.I64)
    np.cumsum(np.fromiter(map(len, samples), np.int64, n), out=offsets[1:])
    total = int(offsets[-1])
    inline = buffer is None or total > buffer.samples
    if n and not inline:
        # One call for the whole batch: numpy lets go of the interpreter lock for a large copy,
        # and a copy per row took the lock back once per row, each time waiting for the event
        # loop's turn to end (the scheduler's thread competes with the loop for it).
        np.concatenate(samples, out=buffer.array[:total])
    audio = None
    if inline:
        audio = np.concatenate([np.asarray(x, dtype=np.float32) for x in samples]).tobytes() if n else b""
    return w.Step(request, -1 if inline else index, list(plan.stream_ids), w.as_column(plan.slots, w.I64),
                  offsets.tobytes(), flags.tobytes(), plan.endpointing, audio)


RING = -2  # the key of the sample ring among the child's mapped buffers


def _ring_samples(step: w.Step, ring: SampleRing | None, parent_slots: np.ndarray) -> RowSamples:
    """A step's audio gathered from the rows' spans of the sample ring."""
    if ring is None:
        raise EngineError("a step named spans of the sample ring before it was attached")
    n = len(parent_slots)
    try:
        spans = w.column(step.spans, w.I64, 2 * n, "spans").reshape(n, 2)
    except w.WireError as exc:
        raise EngineError(f"a malformed step of {n} rows: {exc}") from None
    starts, ends = spans[:, 0], spans[:, 1]
    bad = ((parent_slots < 0) | (parent_slots >= ring.slots) | (starts < 0) | (ends < starts)
           | (ends - starts > ring.width))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise EngineError(f"a malformed step: row {i} spans [{starts[i]}, {ends[i]}) of ring row {parent_slots[i]} "
                          f"(the ring has {ring.slots} rows of {ring.width} samples)")
    return ring.gather(parent_slots, starts, ends)


def _unpack_step(step: w.Step, buffers: dict, slots: _ChildSlots) -> StepPlan:
    """The step's plan on the child's slots, from its columns (StepPlan.from_columns).
    `buffers`: the shared sample buffers by index, and the sample ring at RING."""
    ids = step.stream_ids
    n = len(ids)
    try:
        parent_slots = w.column(step.slots, w.I64, n, "slots")
        flags = w.column(step.flags, w.U8, n, "flags")
    except w.WireError as exc:
        raise EngineError(f"a malformed step of {n} rows: {exc}") from None
    if step.spans is not None:
        rows = _ring_samples(step, buffers.get(RING), parent_slots)
    else:
        rows = _buffer_samples(step, buffers, n)
    if (flags & ~np.uint8(w.FIRST | w.AUDIO_ENDED | w.NEW_UTTERANCE)).any():
        raise EngineError("a malformed step: unknown row flags")
    if any(not 0 <= i < n for i in step.endpointing):
        raise EngineError(f"a malformed step: endpointing for rows {sorted(step.endpointing)} of {n}")
    child_slots = slots.child_slots(parent_slots, ids)
    return StepPlan.from_columns(ids, child_slots, rows, (flags & w.FIRST) != 0,
                                 (flags & w.AUDIO_ENDED) != 0, (flags & w.NEW_UTTERANCE) != 0, step.endpointing)


def _buffer_samples(step: w.Step, buffers: dict, n: int) -> RowSamples:
    """A step's audio at its offsets in a shared buffer, or inline: the flat buffer and its
    offsets, no view per row; valid until the reply (the parent writes the next step into this
    buffer only after it)."""
    if step.audio is not None:
        samples = np.frombuffer(step.audio, dtype=np.float32)
    else:
        buffer = buffers.get(step.buffer)
        if buffer is None or step.buffer == RING:
            raise EngineError(f"a step came through shared buffer {step.buffer} before it was attached")
        samples = buffer.array
    try:
        offsets = w.column(step.offsets, w.I64, n + 1, "offsets")
    except w.WireError as exc:
        raise EngineError(f"a malformed step of {n} rows: {exc}") from None
    lengths = np.diff(offsets)
    if offsets[0] != 0 or (lengths < 0).any() or offsets[-1] > len(samples):
        raise EngineError(f"a malformed step: {n} rows, sample offsets from {offsets[0]} to {offsets[-1]} "
                          f"(not increasing from 0, or past the {len(samples)} samples)")
    return RowSamples(samples, offsets)


def _reply(request: int, plan: StepPlan, result: StepResult, slots: _ChildSlots, clocks: tuple[float, float, float],
           engine) -> w.StepDone:
    """A step's reply: the result's columns as they are (an engine that answers with
    StreamUpdate rows has them laid out as columns here). When the rows are the plan's, in its
    order (the engine contract), the parent takes stream ids and slots from its own plan."""
    c = result.columns
    same = c.stream_ids == plan.stream_ids and np.array_equal(c.slots, plan.slots)
    ids = None if same else list(c.stream_ids)
    parent_slots = None if same else w.as_column(slots.parent_slots(c.slots), w.I64)
    return w.StepDone(request, result.engine, result.timings, (*clocks, time.monotonic()), dict(engine.executions()),
                      _state_of(engine), w.as_column(c.is_final, w.U8), w.as_column(c.frames_decoded, w.I64),
                      w.as_column(c.audio_seconds, w.F64), list(c.text_delta), w.as_column(c.token_offsets, w.I64),
                      w.as_column(c.token_ids, w.I64), list(c.token_pieces), w.as_column(c.token_frames, w.I64),
                      c.starts, c.ends, ids, parent_slots)


def _unpack_result(done: w.StepDone, plan: StepPlan, sent_at: float, replied_at: float) -> StepResult:
    """The StepResult, as columns (StepResult.from_columns), its timings completed with the way
    there and back (the clock readings of both processes: CLOCK_MONOTONIC is one clock for the
    whole machine)."""
    got, started, ended, replied = done.clocks
    try:
        if (done.stream_ids is None) != (done.slots is None):
            raise w.WireError("the rows' stream ids and slots come together or not at all")
        ids = plan.stream_ids if done.stream_ids is None else done.stream_ids
        n = len(ids)
        slots = plan.slots if done.slots is None else w.column(done.slots, w.I64, n, "slots")
        offsets = w.column(done.token_offsets, w.I64, n + 1, "token_offsets")
        tokens = int(offsets[-1])
        if offsets[0] != 0 or (np.diff(offsets) < 0).any() or len(done.token_pieces) != tokens:
            raise w.WireError(f"token offsets from {offsets[0]} to {tokens} do not fit {len(done.token_pieces)} "
                              "tokens")
        if len(done.text_delta) != n:
            raise w.WireError(f"{len(done.text_delta)} texts for {n} rows")
        if any(not 0 <= i < n for i in (*done.starts, *done.ends)):
            raise w.WireError(f"endpoint events for rows outside 0..{n - 1}")
        columns = ResultColumns(stream_ids=ids, slots=slots,
                                is_final=w.column(done.is_final, w.U8, n, "is_final").astype(bool),
                                frames_decoded=w.column(done.frames_decoded, w.I64, n, "frames_decoded"),
                                audio_seconds=w.column(done.audio_seconds, w.F64, n, "audio_seconds"),
                                text_delta=done.text_delta, token_offsets=offsets,
                                token_ids=w.column(done.token_ids, w.I64, tokens, "token_ids"),
                                token_pieces=done.token_pieces,
                                token_frames=w.column(done.token_frames, w.I64, tokens, "token_frames"),
                                starts=done.starts, ends=done.ends)
    except w.WireError as exc:
        raise EngineError(f"a malformed step reply from the engine worker: {exc}") from None
    timings = dataclasses.replace(done.timings, to_worker_ms=1e3 * (got - sent_at),
                                  worker_before_ms=1e3 * (started - got), worker_after_ms=1e3 * (replied - ended),
                                  from_worker_ms=1e3 * (replied_at - replied),
                                  unpack_ms=1e3 * (time.monotonic() - replied_at))
    return StepResult.from_columns(columns, done.engine, timings)


# -- child ---------------------------------------------------------------------------------------
def load_factory(spec: str) -> Callable[[EngineConfig], object]:
    """The engine factory `module:function` names (`asr-server --engine-factory`)."""
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr or "build_engine")
    except (ImportError, AttributeError) as exc:
        raise EngineError(f"cannot load the engine factory {spec!r}: {exc}") from exc


def _error_reply(request: int, exc: BaseException, engine=None) -> w.Error:
    return w.Error(request, type(exc).__name__, str(exc), tuple(getattr(exc, "stream_ids", ()) or ()),
                   getattr(exc, "batch_size", None), dict(engine.executions()) if engine is not None else None,
                   _state_of(engine))


def _state_of(engine) -> str | None:
    state = getattr(engine, "state", None)
    return state.value if isinstance(state, EngineState) else None


class _ChildSlots:
    """The parent's slot numbers onto the child engine's own (the engine's warm-up acquires and
    releases slots of its own, so the two free lists need not agree), as arrays indexed by slot
    (-1: not claimed), so a step's rows map in one array operation."""

    def __init__(self, engine):
        self.engine = engine
        self.to_child = np.full(0, -1, dtype=np.int64)
        self.to_parent = np.full(0, -1, dtype=np.int64)

    @staticmethod
    def _set(table: np.ndarray, at: int, value: int) -> np.ndarray:
        if at >= len(table):
            grown = np.full(max(2 * len(table), at + 1, 64), -1, dtype=np.int64)
            grown[:len(table)] = table
            table = grown
        table[at] = value
        return table

    def claim(self, slot: int) -> None:
        if 0 <= slot < len(self.to_child) and self.to_child[slot] >= 0:
            raise EngineError(f"slot {slot} is claimed already")
        child = self.engine.acquire_slot()
        self.to_child = self._set(self.to_child, slot, child)
        self.to_parent = self._set(self.to_parent, child, slot)

    def release(self, slot: int) -> None:
        child = int(self.to_child[slot]) if 0 <= slot < len(self.to_child) else -1
        if child < 0:
            raise KeyError(slot)
        self.to_child[slot] = -1
        self.to_parent[child] = -1
        self.engine.release_slot(child)

    @staticmethod
    def _map(table: np.ndarray, slots: np.ndarray) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64)
        known = (slots >= 0) & (slots < len(table))
        out = np.full(len(slots), -1, dtype=np.int64)
        out[known] = table[slots[known]]
        return out

    def child_slots(self, slots: np.ndarray, stream_ids: list[str]) -> np.ndarray:
        child = self._map(self.to_child, slots)
        unknown = np.flatnonzero(child < 0)
        if unknown.size:
            ids = tuple(stream_ids[i] for i in unknown.tolist())
            raise BadChunkError(f"invalid chunks: slots not acquired through the engine worker: {ids}", ids)
        return child

    def parent_slots(self, slots: np.ndarray) -> np.ndarray:
        """The engine's slots as the parent's (a slot the parent did not claim stays as it is)."""
        parent = self._map(self.to_parent, slots)
        return np.where(parent >= 0, parent, slots)


def _child_main(sock: socket.socket) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:  # a name for ps and top, and for the load generator's CPU report (client.loadgen_report)
        with open("/proc/self/comm", "w") as f:
            f.write(PROCESS_NAME)
    except OSError:
        pass
    from server.runtime.gc_policy import apply_gc_policy
    from server.runtime.logging_setup import configure_logging

    link = _Link(sock, w.TO_WORKER)
    try:
        start = link.read()
    except (OSError, w.WireError):
        return
    if not isinstance(start, w.Configure):
        return  # not our parent's first message: nothing to build
    configure_logging(start.log_level, start.log_format)
    try:
        engine = load_factory(start.factory)(start.config)
        report = getattr(engine, "startup_report", None)
        link.send(w.Hello(version=w.PROTOCOL_VERSION, role=w.ROLE_ENGINE_WORKER, model_info=engine.model_info,
                          geometry=engine.geometry, capacity=engine.capacity, max_batch=engine.max_batch,
                          startup_report=w.plain_report(report.as_dict() if hasattr(report, "as_dict") else None),
                          executions=dict(engine.executions())))
    except BaseException as exc:  # noqa: BLE001 - the parent reports why the engine cannot start
        with contextlib.suppress(OSError):
            link.send(w.Error(0, type(exc).__name__, f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)))
        return
    slots = _ChildSlots(engine)
    buffers: dict[int, _SampleBuffer] = {}
    ahead = _ReadAhead(link, engine, slots, buffers)
    started: _Started | None = None  # the next step, its device work already queued
    while True:
        if started is not None:
            message, early = started.message, None
        else:
            try:
                message, early = ahead.next()
            except OSError:  # the parent is gone
                return
            except w.WireError as exc:
                log.error("closing the engine worker's link: bad frame", extra={"error": str(exc)})
                return
        kind = type(message)
        if kind is w.Step:
            current, started = started, None
            try:
                if current is None:
                    current = _start(message, early, engine, ahead, slots, buffers)
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to the scheduler
                current = _Started(message, time.monotonic(), time.monotonic(), None, error=exc)
            # a failure of this step is its reply; a next step begun meanwhile carries on
            reply, started = _finish(current, engine, ahead, slots)
        elif kind is w.Claim or kind is w.Release:
            _apply_slot_message(message, slots)
            continue
        elif kind is w.Attach or kind is w.AttachRing:
            try:
                if kind is w.Attach:
                    buffers[message.index] = _SampleBuffer(message.path, message.samples)
                else:
                    buffers[RING] = SampleRing.attach(message.path, message.slots, message.width)
                reply = w.Done(message.id, None, dict(engine.executions()), _state_of(engine))
            except BaseException as exc:  # noqa: BLE001 - the parent then sends audio another way
                reply = _error_reply(message.id, exc, engine)
        elif kind is w.Warmup:
            try:
                name = engine.warmup()
                apply_gc_policy(start.gc_freeze, start.gc_threshold)
                reply = w.Done(message.id, name, dict(engine.executions()), _state_of(engine))
            except BaseException as exc:  # noqa: BLE001
                reply = _error_reply(message.id, exc, engine)
        elif kind is w.Stop or message is None:
            return
        else:  # a second Configure: the decoder admits nothing else
            log.error("closing the engine worker's link: unexpected message", extra={"kind": kind.__name__})
            return
        try:
            link.send(reply)
        except OSError:
            return


@dataclasses.dataclass
class _Started:
    """A step whose run has begun: its request, when it was read and began, and its StepRun
    (at QUEUED, or finished), or why it could not begin."""

    message: w.Step
    got: float
    began: float
    plan: StepPlan | None
    run: object = None           # a StepRun, or a plain engine's StepResult
    error: BaseException | None = None


def _start(message: w.Step, early: "_Early | None", engine, ahead: "_ReadAhead", slots: "_ChildSlots",
           buffers: dict) -> _Started:
    """Unpack (or take the prepared plan of) a step and queue its device work."""
    if early is None:
        got = time.monotonic()
        plan = _unpack_step(message, buffers, slots)
        work = plan
    else:  # read and prepared while the previous step ran on the device
        got, plan, work = early.unwrap()
    began = time.monotonic()
    if not ahead.stages:  # an engine without stages (a test's fake): its whole step, here
        return _Started(message, got, began, plan, engine.step(work))
    run = engine.start_step(work)
    run.advance()
    return _Started(message, got, began, plan, run)


def _finish(current: _Started, engine, ahead: "_ReadAhead", slots: "_ChildSlots"):
    """Run a begun step to its end: while its device work runs, read ahead (the next step is
    prepared); once the device has finished it, queue the next step's device work; then this
    step's host part, and its reply. Returns (the reply, the next step begun or None)."""
    nxt = None
    try:
        if current.error is not None:
            raise current.error
        run = current.run
        if ahead.stages:
            # From which stage the next step's device work may be queued behind this one's:
            # QUEUED where the engine decodes on a stream of its own (the next encoder runs
            # beside this decode), else DEVICE_DONE.
            early_next = getattr(engine, "next_at", DEVICE_DONE) == QUEUED
            if run.stage == QUEUED:
                ahead.during_step(run)
                if early_next:
                    nxt = ahead.start_next()
                run.advance()
            if run.stage == DEVICE_DONE and nxt is None:
                if early_next:  # a step that came during the decode goes on the device before the results
                    ahead.during_step(run, wait=False)
                nxt = ahead.start_next()
            while run.advance():
                pass
            result = run.result
        else:
            result = run
        reply = _reply(current.message.id, current.plan, result, slots, (current.got, current.began, time.monotonic()),
                       engine)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the scheduler, in its turn
        reply = _error_reply(current.message.id, exc, engine)
    return reply, nxt


def _apply_slot_message(message, slots: "_ChildSlots") -> None:
    try:
        if type(message) is w.Claim:
            slots.claim(message.slot)
        else:
            slots.release(message.slot)
    except BaseException:  # noqa: BLE001 - a failed claim: the slot's steps will be refused as unknown
        log.exception("applying a slot message in the engine worker failed",
                      extra={"slot": message.slot, "kind": type(message).__name__})


@dataclasses.dataclass
class _Early:
    """A step read ahead: when it was read, and its plan prepared, or why it could not be."""

    got: float
    plan: StepPlan | None = None
    prepared: object = None
    error: BaseException | None = None

    def unwrap(self):
        if self.error is not None:
            raise self.error
        return self.got, self.plan, self.prepared


class _ReadAhead:
    """The child's reads, with one step of look-ahead: while the device runs a step
    (`_finish` calls `during_step` once the step's StepRun is QUEUED: features, gather and
    encoder queued, before it first waits for the device), the messages that have already arrived are taken
    without waiting; claims and releases apply at once (they touch no slot of a step in flight:
    the scheduler releases a slot only when no step holds it), and the first step among them is
    unpacked and prepared (StreamingEngine.prepare: its rows checked and its windows assembled,
    host work that no longer waits for the step before it). Its streams are not in the running
    step (a stream is in one submitted step at a time), so the order of their work is kept.
    Replies keep the order of the requests."""

    def __init__(self, link: _Link, engine, slots: "_ChildSlots", buffers: dict):
        self.link, self.engine, self.slots, self.buffers = link, engine, slots, buffers
        self.stages = callable(getattr(engine, "start_step", None))
        self.prepares = self.stages and callable(getattr(engine, "prepare", None))
        self._backlog: collections.deque = collections.deque()  # (message, _Early | None)
        self._broken: BaseException | None = None

    def next(self):
        if self._backlog:
            return self._backlog.popleft()
        if self._broken is not None:
            raise self._broken
        return self.link.read(), None

    def start_next(self) -> "_Started | None":
        """The next step begun (its device work queued behind the current one's), when it was
        read and prepared ahead; None otherwise. A failure to begin is kept for its turn."""
        if not self._backlog or type(self._backlog[0][0]) is not w.Step or self._backlog[0][1] is None:
            return None
        message, early = self._backlog.popleft()
        began = time.monotonic()
        if early.error is not None:
            return _Started(message, early.got, began, early.plan, error=early.error)
        try:
            run = self.engine.start_step(early.prepared)
            run.advance()
        except BaseException as exc:  # noqa: BLE001 - replied in its turn
            return _Started(message, early.got, began, early.plan, error=exc)
        return _Started(message, early.got, began, early.plan, run)

    def during_step(self, run, wait: bool = True) -> None:
        """While `run` (at QUEUED) keeps the device busy, take the messages that arrive, until a
        step is among them: the parent sends the next step before this one ends (the
        scheduler's `overlap_at`), and it is prepared here, on the host, while the device works.
        wait=False takes only what has already arrived."""
        if not self.prepares or self._backlog or self._broken is not None:
            return
        busy = getattr(run, "device_busy", None) if wait else None
        while True:
            try:
                message = self.link.poll()
            except (OSError, w.WireError) as exc:  # met again by the main loop, in order
                self._broken = exc
                return
            if message is NOTHING:
                if busy is None or not busy():
                    return
                self.link.wait_readable(DURING_STEP_POLL_S)
                continue
            if type(message) is w.Claim or type(message) is w.Release:
                _apply_slot_message(message, self.slots)
                continue
            early = None
            if type(message) is w.Step:
                early = _Early(time.monotonic())
                try:
                    early.plan = _unpack_step(message, self.buffers, self.slots)
                    early.prepared = self.engine.prepare(early.plan)
                except BaseException as exc:  # noqa: BLE001 - replied in its turn
                    early.error = exc
            self._backlog.append((message, early))
            return


# How long the child waits for the next step's message at a time while the device is busy: the
# device's state is asked again after each wait.
DURING_STEP_POLL_S = 0.0005

# -- parent --------------------------------------------------------------------------------------
_ERRORS = {"BadChunkError": BadChunkError, "StreamStateLostError": StreamStateLostError}


class EngineWorker:
    """A StreamingEngine running in a child process (see the module docstring). Start it with
    `EngineWorker.start`; `close` stops the child."""

    def __init__(self, process, link: _Link, hello: w.Hello):
        self._process = process
        self._link = link
        self._sock = link.sock
        self.geometry = hello.geometry
        self.model_info = hello.model_info
        self.capacity = hello.capacity
        self.max_batch = hello.max_batch
        self.startup_report = hello.startup_report
        self._executions = dict(hello.executions)
        self._allocator = SlotAllocator(hello.capacity)
        self._send_lock = threading.Lock()   # held while bytes go into the socket (loop, writer thread)
        # Frames that could not be written at once: the writer thread writes them, in order, so
        # that no event loop ever blocks on a full socket (a stopped worker reads nothing).
        self._outbox: collections.deque[bytes] = collections.deque()
        self._outbox_ready = threading.Condition()
        self._writer: threading.Thread | None = None
        self._poll = select.poll()
        self._poll.register(self._sock.fileno(), select.POLLOUT)
        self._request_lock = threading.Lock()  # one blocking request and its reply at a time
        self._next_id = 0
        self._dead_reason: str | None = None
        self._closing = False
        self._buffers: dict[int, _SampleBuffer] = {}
        self.sample_ring: SampleRing | None = None  # each slot's audio, mapped by the child too (_attach_ring)
        # Asynchronous steps (step_async), by request id: the reply names the request it answers.
        self._waiting: dict[int, _Pending] = {}
        self._free_buffers: list[int] = list(range(STEPS_IN_FLIGHT - 1, -1, -1))
        self._room: asyncio.Semaphore | None = None
        self._reader: threading.Thread | None = None
        self.state = EngineState.READY

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @classmethod
    def start(cls, factory: str, cfg: EngineConfig, options: ChildOptions | None = None) -> EngineWorker:
        """Spawn the child, send it what to build, wait until its engine is built. Raises
        EngineError with the child's reason when it cannot start (or exits first)."""
        options = options or ChildOptions()
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state, no locks held
        parent, child = socket.socketpair()
        process = ctx.Process(target=_child_main, args=(child,), name="asr-engine-worker")
        try:
            process.start()
        finally:
            child.close()
        link = _Link(parent, w.FROM_WORKER)
        try:
            link.send(w.Configure(factory, cfg, options.log_level, options.log_format, options.gc_freeze,
                                  options.gc_threshold))
            while not select.select([parent], [], [], 0.2)[0]:
                if not process.is_alive():
                    raise EngineError(f"the engine worker process exited with status {process.exitcode} before it was ready")
            first = link.read()
            if first is None:
                raise EOFError
        except (EOFError, OSError) as exc:
            process.join(5)
            parent.close()
            raise EngineError(f"the engine worker process exited with status {process.exitcode} before it was ready") from exc
        except BaseException:
            process.kill()
            process.join(5)
            parent.close()
            raise
        if isinstance(first, w.Error):
            process.join(5)
            parent.close()
            raise EngineError(first.message)
        try:
            hello = w.check_hello(first, w.ROLE_ENGINE_WORKER)
        except w.WireError as exc:
            process.kill()
            process.join(5)
            parent.close()
            raise EngineError(f"the engine worker's handshake failed: {exc}") from exc
        worker = cls(process, link, hello)
        # The child ignores SIGTERM and waits for its link to close; at interpreter exit
        # multiprocessing joins its children before this object is gone, so close it first.
        atexit.register(worker.close)
        for index in range(STEPS_IN_FLIGHT):
            worker._attach_buffer(index)
        worker._attach_ring()
        return worker

    def _attach_ring(self) -> None:
        """The sample ring the scheduler writes each slot's audio into (`sample_ring`, read by
        server.scheduling.scheduler), shared with the child (and with frontend processes, which
        write their streams' audio into it: server.runtime.remote_scheduler). Without it (no
        shared memory could be made or mapped) the scheduler keeps a ring of its own and steps
        copy their audio."""
        try:
            ring = SampleRing.shared(self.capacity, ring_width(self.geometry))
        except OSError as exc:
            log.warning("no shared sample ring; steps copy their audio", extra={"error": str(exc)})
            return
        try:
            self._request(lambda request: w.AttachRing(request, ring.path, ring.slots, ring.width))
            self.sample_ring = ring
        except EngineError as exc:
            ring.close()
            if self._dead_reason is not None:
                raise
            log.warning("the engine worker could not map the shared sample ring; steps copy their audio",
                        extra={"error": str(exc)})

    def _attach_buffer(self, index: int) -> None:
        """Shared sample buffer `index`, sized for the largest step (every row a stream's first
        chunk, the longest). Without it (no file could be mapped), audio goes inline."""
        try:
            buffer = _SampleBuffer.create(self.max_batch * self.geometry.samples_needed(0))
        except OSError as exc:
            log.warning("no shared sample buffer; step audio goes inline", extra={"error": str(exc)})
            return
        try:
            self._request(lambda request: w.Attach(request, index, buffer.path, buffer.samples))
            self._buffers[index] = buffer
        except EngineError as exc:
            if self._dead_reason is not None:
                raise
            log.warning("the engine worker could not map the shared sample buffer; step audio goes inline",
                        extra={"error": str(exc)})
        finally:
            buffer.unlink()

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # -- slots (event loop) ---------------------------------------------------------------------
    def acquire_slot(self) -> int:
        slot = self._allocator.acquire()
        try:
            self._send(w.Claim(slot))
        except EngineError:
            self._allocator.release(slot)
            raise
        return slot

    def release_slot(self, slot: int) -> None:
        self._allocator.release(slot)
        try:
            self._send(w.Release(slot))
        except EngineError:
            pass  # the child is gone, and its slots with it

    def slots_in_use(self) -> int:
        return self._allocator.in_use()

    def executions(self) -> dict[str, int]:
        return dict(self._executions)

    # -- requests ----------------------------------------------------------------------------------
    def step(self, plan: StepPlan) -> StepResult:
        with self._request_lock:  # buffer 0 is written for this request only
            sent_at = time.monotonic()
            message = _pack_step(plan, self._buffers.get(0), 0, self._new_id(), self.sample_ring)
            done, replied_at = self._exchange(message)
            return _unpack_result(done, plan, sent_at, replied_at)

    async def step_async(self, plan: StepPlan) -> StepResult:
        """`step` for a caller on an event loop (the scheduler): the audio copy and the rebuilding
        of the result run on the loop's thread, where the scheduler's books already hold the
        interpreter lock, instead of on a thread that competes with the loop for it. Replies are
        read by a thread of their own (blocking reads; it takes the lock once per reply to hand
        the bytes over). Up to STEPS_IN_FLIGHT steps are sent at once, each with its own buffer,
        so the worker starts the next step the moment it has replied to one. Once this has been
        called, blocking requests (`step`, `warmup`) are refused: the reader owns the replies."""
        loop = asyncio.get_running_loop()
        if self._room is None:
            self._room = asyncio.Semaphore(STEPS_IN_FLIGHT)
        await self._room.acquire()
        index = self._free_buffers.pop()

        def release(_=None) -> None:
            self._free_buffers.append(index)
            self._room.release()

        pending = _Pending(loop.create_future())
        sent = False
        request = self._new_id()
        try:
            sent_at = time.monotonic()
            message = _pack_step(plan, self._buffers.get(index), index, request, self.sample_ring)
            self._start_reader(loop)
            self._waiting[request] = pending
            try:
                self._send(message)
            except EngineError:
                self._waiting.pop(request, None)
                raise
            sent = True
            done, replied_at = await pending.result
        except BaseException:
            # A cancelled caller leaves the request to finish: its buffer stays the worker's
            # until the reply (or the link's end) says the worker is done reading it.
            if sent and not pending.arrived:
                pending.on_arrival = release
            else:
                release()
            raise
        release()
        return _unpack_result(done, plan, sent_at, replied_at)

    def _start_reader(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._reader is not None:
            return
        if self._dead_reason is not None:
            raise EngineError(self._dead_reason)
        self._reader = threading.Thread(target=self._read_replies, args=(loop,), name="engine-worker-replies",
                                        daemon=True)
        self._reader.start()

    def _read_replies(self, loop: asyncio.AbstractEventLoop) -> None:
        """The reader thread: each frame, as bytes, to the loop (decoded there); the link's end,
        or a frame that cannot be read, fails what waits."""
        while True:
            try:
                bodies = self._link.read_frames()
            except w.WireError as exc:
                log.error("closing the engine worker's link: bad frame", extra={"error": str(exc)})
                call_soon_from_thread(loop, self._fail_waiting, f"the engine worker's link broke: {exc}")
                return
            except OSError:
                bodies = None
            if bodies is None:
                call_soon_from_thread(loop, self._fail_waiting)
                return
            replied_at = time.monotonic()
            for body in bodies:
                call_soon_from_thread(loop, self._deliver, body, replied_at)

    def _deliver(self, body: bytes, replied_at: float) -> None:
        """On the loop: each reply to the step that waits for it (matched by request id)."""
        try:
            replies = self._link.decoder.decode(body)
        except w.WireError as exc:
            log.error("closing the engine worker's link: bad frame", extra={"error": str(exc)})
            self.abandon(f"the engine worker's link broke: {exc}")
            self._fail_waiting()
            return
        for reply in replies:
            pending = self._waiting.pop(getattr(reply, "id", 0), None)
            if pending is None:
                log.error("a reply from the engine worker to no request", extra={"kind": type(reply).__name__})
                continue
            try:
                value: object = (self._result_of(reply), replied_at)
            except EngineError as exc:
                value = exc
            pending.arrive(value)

    def _fail_waiting(self, reason: str | None = None) -> None:
        if reason is not None and self._dead_reason is None:
            self.abandon(reason)
        reason = self._died()
        waiting, self._waiting = self._waiting, {}
        for pending in waiting.values():
            pending.arrive(EngineError(reason))

    def warmup(self) -> str:
        return self._request(w.Warmup)

    def _request(self, make: Callable[[int], w.Message]):
        with self._request_lock:
            return self._exchange(make(self._new_id()))[0]

    def _exchange(self, message) -> tuple[object, float]:
        """Send a request and wait for its reply: its value and when it arrived. The caller
        holds the request lock."""
        if self._reader is not None:
            raise EngineError("a blocking request after asynchronous steps began: the reply reader owns the link")
        self._send(message)
        while True:
            try:
                reply = self._link.read()
            except w.WireError as exc:
                self.abandon(f"the engine worker's link broke: {exc}")
                raise EngineError(self._dead_reason) from exc
            except OSError as exc:
                raise EngineError(self._died()) from exc
            if reply is None:
                raise EngineError(self._died())
            if getattr(reply, "id", None) == message.id:
                return self._result_of(reply), time.monotonic()
            log.error("a reply from the engine worker to no request", extra={"kind": type(reply).__name__})

    def _result_of(self, reply):
        """A reply's value (a step's: the StepDone itself), or its error raised as the type the
        engine raised."""
        if reply.executions is not None:
            self._executions = reply.executions
        self._note_state(reply.state)
        if type(reply) is w.StepDone:
            return reply
        if type(reply) is w.Done:
            return reply.value
        if type(reply) is not w.Error:
            raise EngineError(f"the engine worker answered with {type(reply).__name__}")
        name, text = reply.name, reply.message
        if name == "EngineOverloadedError":
            raise EngineOverloadedError(text, reply.batch_size)
        if name in _ERRORS:
            raise _ERRORS[name](text, reply.stream_ids)
        if name == "PoolExhaustedError":
            raise PoolExhaustedError(text)
        raise EngineError(text if name == "EngineError" else f"{name}: {text}")

    def _note_state(self, state: str | None) -> None:
        if state == EngineState.DEAD.value:
            self.state = EngineState.DEAD

    def _send(self, message: w.Message) -> None:
        """Send without blocking: written at once when nothing waits before it and the socket
        has room for it, else queued for the writer thread. A worker that stopped reading (hung,
        SIGSTOP) thus fills the queue, not the event loop's time."""
        if self._dead_reason is not None:
            raise EngineError(self._dead_reason)
        data = w.encode_frame([message])
        if self._send_lock.acquire(blocking=False):
            try:
                # A Unix socket reports POLLOUT while at most a quarter of its buffer is in use:
                # a frame this small then goes in without waiting.
                if not self._outbox and len(data) <= _DIRECT_SEND_BYTES and self._poll.poll(0):
                    self._sock.sendall(data)
                    return
            except OSError as exc:  # BrokenPipeError; EBADF: the link was closed
                raise EngineError(self._died()) from exc
            finally:
                self._send_lock.release()
        with self._outbox_ready:
            self._outbox.append(data)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_queued, name="engine-worker-writer", daemon=True)
                self._writer.start()
            self._outbox_ready.notify()

    def _write_queued(self) -> None:
        """The writer thread: queued frames into the socket, in order (blocking writes)."""
        while True:
            with self._outbox_ready:
                while not self._outbox:
                    self._outbox_ready.wait()
            with self._send_lock:
                while self._outbox:
                    data = self._outbox.popleft()
                    if data is None:
                        return
                    try:
                        self._sock.sendall(data)
                    except OSError:  # the worker is gone; the watcher reports it
                        self._outbox.clear()
                        return

    def abandon(self, reason: str) -> None:
        """The scheduler gave up on a worker that stopped answering: kill it now, so that it
        frees its device and close() does not wait for it."""
        if self._dead_reason is None:
            self._dead_reason = reason
            self.state = EngineState.DEAD
        if self._process.exitcode is None:
            log.critical("killing the engine worker", extra={"pid": self._process.pid, "reason": reason})
            self._process.kill()

    def _died(self) -> str:
        if self._dead_reason is None:
            self._process.join(1.0)
            code = self._process.exitcode
            self._dead_reason = (f"the engine worker process exited (status {code})" if code is not None
                                 else "the engine worker process stopped answering")
            self.state = EngineState.DEAD
        return self._dead_reason

    # -- lifetime -------------------------------------------------------------------------------
    def watch(self, on_exit: Callable[[str], None]) -> None:
        """Call `on_exit(reason)` (from a watcher thread) if the child exits before `close`,
        so a dead engine is noticed without waiting for the next step."""
        def wait() -> None:
            multiprocessing.connection.wait([self._process.sentinel])
            if not self._closing:
                on_exit(self._died())

        threading.Thread(target=wait, name="engine-worker-watch", daemon=True).start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the child: asked first, then terminated, then killed."""
        if self._closing:
            return
        self._closing = True
        if self.sample_ring is not None:
            self.sample_ring.close()  # (mapped where it is, it stays until those processes end)
        try:
            self._send(w.Stop())
        except EngineError:
            pass
        deadline = time.monotonic() + timeout_s
        self._process.join(timeout_s)
        for stop in (self._process.terminate, self._process.kill):
            if self._process.exitcode is not None:
                break
            stop()
            self._process.join(max(1.0, deadline - time.monotonic()))
        with self._outbox_ready:  # the writer thread (if any) ends
            self._outbox.append(None)
            self._outbox_ready.notify()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

"""The engine in a worker process of its own, so that the engine and the scheduler's event loop do not
share one interpreter lock.

Why: an engine step is a few dozen short GPU launches with Python between them; while the event
loop holds the lock (the per-chunk books, gRPC or the frontends' wire), the GPU runs dry. On an
H100 a pure-Python thread busy 45% of the time beside the engine thread stretched a step of 128
streams from 13.3 to 17.2 ms, and at 70% to 21.0 ms (bench/shared_gpu_step.py --gil-loads,
bench/RESULTS.md); the server's event loop at 1,000 streams is such a thread. In its own
process the engine thread runs alone.

Parent side: `EngineWorker`, a StreamingEngine whose step is a round trip over a pipe. The
scheduler awaits it on its event loop (`step_async`); `step` blocks instead, for callers without
a loop. Slots are allocated here, where the books are, and each acquire and release is sent ahead of any step that uses the slot; the
child maps them onto slots of its own engine, whose own checks still apply.

A step's audio does not go through the pipe: it is copied into a buffer both processes map
(`_SampleBuffer`), and the pipe carries the rows' ids, slots, flags and lengths. Through the
pipe, the 1-5 MB of a large step went in socket-buffer-sized writes, and between writes the
engine thread waited for the interpreter lock the event loop held: on an H100 at 1,920 streams
(560 ms) the scheduler waited 44.9 ms for steps that took 23.2 ms inside the engine
(asr_step_seconds against asr_engine_step_seconds, bench/RESULTS.md). There are two buffers:
the scheduler keeps two steps submitted, and `step_async` sends both, so the worker starts the
second the moment it has replied to the first.

Child side: `_child_main` builds the engine with the named factory (as `asr-server
--engine-factory` names it), reports what the server needs to know about it, then answers
requests in order until the pipe closes. It ignores SIGINT and SIGTERM: the parent decides when
it stops (a Ctrl-C reaches the whole process group, and the parent's drain still needs it).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import dataclasses
import logging
import marshal
import mmap
import multiprocessing
import multiprocessing.connection
import multiprocessing.reduction
import os
import select
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from engines.api import (BadChunkError, ChunkWork, EndpointingParams, EngineError, EngineOverloadedError, EngineState, ModelInfo,
                         PoolExhaustedError, StepPlan, StepResult, StepTimings, StreamStateLostError, StreamUpdate,
                         TokenEvent)
from engines.config import EngineConfig
from engines.geometry import ChunkGeometry
from engines.slot_allocator import SlotAllocator
from server.loop_calls import call_soon_from_thread

log = logging.getLogger("nemostream.engine_worker")
_ForkingPickler = multiprocessing.reduction.ForkingPickler  # what Connection.send pickles with
_DIRECT_SEND_BYTES = 16 << 10  # larger messages (a step through the pipe) go by the writer thread
STEPS_IN_FLIGHT = 2  # asynchronous steps sent at once (the scheduler's pipeline depth is 2)
PROCESS_NAME = "asr-engine"  # what ps shows for the child


@dataclass(frozen=True)
class ChildOptions:
    """How the child sets itself up: logging as the parent's, and the garbage collector's
    policy after warm-up (server.gc_policy), since the child allocates per step too."""

    log_level: str = "INFO"
    log_format: str = "text"
    gc_freeze: bool = True
    gc_threshold: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class _Facts:
    geometry: ChunkGeometry
    model_info: ModelInfo
    capacity: int
    max_batch: int
    startup_report: dict | None  # the engine's StartupReport.as_dict(): its dataclass would import torch here
    executions: dict[str, int]


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


def _pack_step(plan: StepPlan, buffer: _SampleBuffer | None, index: int = 0) -> tuple:
    """The message for a step: its audio into the shared buffer and the rest as plain lists, or
    the whole plan through the pipe when the buffer is missing or too small."""
    chunks = plan.chunks
    lengths = [len(c.samples) for c in chunks]
    total = sum(lengths)
    if buffer is None or total > buffer.samples:
        return ("step", plan)
    if chunks:
        # One call for the whole batch: numpy lets go of the interpreter lock for a large copy,
        # and a copy per row took the lock back once per row, each time waiting for the event
        # loop's turn to end (the scheduler's thread competes with the loop for it).
        np.concatenate([c.samples for c in chunks], out=buffer.array[:total])
    # Endpointing settings ride on first chunks only, as plain tuples (marshal takes no dataclass).
    return ("step_shared", index, [c.stream_id for c in chunks], [c.slot for c in chunks], lengths,
            [c.first for c in chunks], [c.audio_ended for c in chunks],
            [c.endpointing.as_tuple() if c.endpointing is not None else None for c in chunks],
            [c.new_utterance for c in chunks])


def _unpack_step(message: tuple, buffers: dict[int, _SampleBuffer], slots: _ChildSlots) -> StepPlan:
    """The step's plan on the child's slots."""
    if message[0] == "step":
        return slots.plan(message[1])
    _, index, ids, parent_slots, lengths, firsts, ends, endpointing, new_utterance = message
    buffer = buffers.get(index)
    if buffer is None:
        raise EngineError(f"a step came through shared buffer {index} before it was attached")
    chunks, at = [], 0
    for sid, slot, n, first, ended, ep, new in zip(ids, parent_slots, lengths, firsts, ends, endpointing, new_utterance):
        # A view, valid until the reply: the parent writes the next step only after it.
        chunks.append(ChunkWork(sid, slots.child_slot(slot, sid), buffer.array[at:at + n], first, ended,
                                EndpointingParams(*ep) if ep is not None else None, new))
        at += n
    return StepPlan(tuple(chunks))


# Replies go back marshalled, not pickled: unpickling a step's updates ran a Python constructor
# per update and per token on the scheduler's side, where every bit of Python competes with the
# event loop for the interpreter lock; marshal builds plain tuples in C.
_TIMING_FIELDS = tuple(f.name for f in dataclasses.fields(StepTimings))
_new_tuple = tuple.__new__


def _pack_result(result: StepResult) -> tuple:
    return (result.engine, tuple(getattr(result.timings, f) for f in _TIMING_FIELDS),
            [(u.stream_id, u.slot, u.text_delta, u.is_final, u.frames_decoded, u.audio_seconds,
              tuple(map(tuple, u.tokens)), u.starts, u.ends) for u in result.updates])


def _unpack_result(packed: tuple, sent_at: float, replied_at: float) -> StepResult:
    """The StepResult, its timings completed with the way there and back (the clock readings of
    both processes: CLOCK_MONOTONIC is one clock for the whole machine)."""
    engine, timings, rows, (got, started, ended, replied) = packed
    updates = []
    for sid, slot, text, final, frames, seconds, tokens, starts, ends in rows:
        # TokenEvent rows made in C (tuple.__new__ through map), not by a Python call per token.
        updates.append(StreamUpdate(stream_id=sid, slot=slot, tokens=tuple(map(_new_tuple, repeat(TokenEvent), tokens)),
                                    text_delta=text, is_final=final, frames_decoded=frames, audio_seconds=seconds,
                                    starts=starts, ends=ends))
    timings = dict(zip(_TIMING_FIELDS, timings))
    timings.update(to_worker_ms=1e3 * (got - sent_at), worker_before_ms=1e3 * (started - got),
                   worker_after_ms=1e3 * (replied - ended), from_worker_ms=1e3 * (replied_at - replied),
                   unpack_ms=1e3 * (time.monotonic() - replied_at))
    return StepResult(updates=tuple(updates), engine=engine, timings=StepTimings(**timings))


def _reply(conn: multiprocessing.connection.Connection, reply: tuple) -> None:
    conn.send_bytes(marshal.dumps(reply))


# -- child ---------------------------------------------------------------------------------------
def load_factory(spec: str) -> Callable[[EngineConfig], object]:
    """The engine factory `module:function` names (`asr-server --engine-factory`)."""
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr or "build_engine")
    except (ImportError, AttributeError) as exc:
        raise EngineError(f"cannot load the engine factory {spec!r}: {exc}") from exc


def _error_reply(exc: BaseException, executions: dict[str, int], state: str | None) -> tuple:
    return ("err", type(exc).__name__, str(exc), tuple(getattr(exc, "stream_ids", ()) or ()),
            getattr(exc, "batch_size", None), executions, state)


def _state_of(engine) -> str | None:
    state = getattr(engine, "state", None)
    return state.value if isinstance(state, EngineState) else None


class _ChildSlots:
    """The parent's slot numbers onto the child engine's own (the engine's warm-up acquires and
    releases slots of its own, so the two free lists need not agree)."""

    def __init__(self, engine):
        self.engine = engine
        self.to_child: dict[int, int] = {}
        self.to_parent: dict[int, int] = {}

    def claim(self, slot: int) -> None:
        child = self.engine.acquire_slot()
        self.to_child[slot], self.to_parent[child] = child, slot

    def release(self, slot: int) -> None:
        child = self.to_child.pop(slot)
        del self.to_parent[child]
        self.engine.release_slot(child)

    def child_slot(self, slot: int, stream_id: str) -> int:
        try:
            return self.to_child[slot]
        except KeyError:
            raise BadChunkError(f"invalid chunks: slot {slot} was not acquired through the engine worker",
                                (stream_id,)) from None

    def plan(self, plan: StepPlan) -> StepPlan:
        """A plan that came whole through the pipe, on the child's slots."""
        unknown = tuple(c.stream_id for c in plan.chunks if c.slot not in self.to_child)
        if unknown:
            raise BadChunkError(f"invalid chunks: slots not acquired through the engine worker: {unknown}", unknown)
        return StepPlan(tuple(dataclasses.replace(c, slot=self.to_child[c.slot]) for c in plan.chunks))

    def result(self, result: StepResult) -> StepResult:
        """The updates back on the parent's slots, set in place: the engine built them for this
        step and nothing else holds them (dataclasses.replace per row cost ~2 ms a step)."""
        for u in result.updates:
            parent = self.to_parent.get(u.slot, u.slot)
            if parent != u.slot:
                object.__setattr__(u, "slot", parent)
        return result


def _child_main(conn: multiprocessing.connection.Connection, factory: str, cfg: EngineConfig,
                options: ChildOptions) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:  # a name for ps and top, and for the load generator's CPU report (client.loadgen_report)
        with open("/proc/self/comm", "w") as f:
            f.write(PROCESS_NAME)
    except OSError:
        pass
    from server.gc_policy import apply_gc_policy
    from server.logging_setup import configure_logging

    configure_logging(options.log_level, options.log_format)
    try:
        engine = load_factory(factory)(cfg)
        report = getattr(engine, "startup_report", None)
        conn.send(("hello", _Facts(engine.geometry, engine.model_info, engine.capacity, engine.max_batch,
                                   report.as_dict() if hasattr(report, "as_dict") else None,
                                   dict(engine.executions()))))
    except BaseException as exc:  # noqa: BLE001 - the parent reports why the engine cannot start
        conn.send(("failed", f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)))
        return
    slots = _ChildSlots(engine)
    buffers: dict[int, _SampleBuffer] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        op = message[0]
        if op in ("step", "step_shared"):
            try:
                got = time.monotonic()
                plan = _unpack_step(message, buffers, slots)
                started = time.monotonic()
                result = slots.result(engine.step(plan))
                ended = time.monotonic()
                packed = _pack_result(result)
                reply = ("ok", packed + ((got, started, ended, time.monotonic()),),
                         dict(engine.executions()), _state_of(engine))
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to the scheduler
                reply = _error_reply(exc, dict(engine.executions()), _state_of(engine))
            _reply(conn, reply)
        elif op == "attach":
            try:
                buffers[message[1]] = _SampleBuffer(message[2], message[3])
                _reply(conn, ("ok", None, dict(engine.executions()), _state_of(engine)))
            except BaseException as exc:  # noqa: BLE001 - the parent then sends audio through the pipe
                _reply(conn, _error_reply(exc, dict(engine.executions()), _state_of(engine)))
        elif op == "claim":
            try:
                slots.claim(message[1])
            except BaseException:  # noqa: BLE001 - the slot's steps will be refused as unknown
                log.exception("claiming a slot in the engine worker failed", extra={"slot": message[1]})
        elif op == "release":
            try:
                slots.release(message[1])
            except BaseException:  # noqa: BLE001
                log.exception("releasing a slot in the engine worker failed", extra={"slot": message[1]})
        elif op == "warmup":
            try:
                name = engine.warmup()
                apply_gc_policy(options.gc_freeze, options.gc_threshold)
                _reply(conn, ("ok", name, dict(engine.executions()), _state_of(engine)))
            except BaseException as exc:  # noqa: BLE001
                _reply(conn, _error_reply(exc, dict(engine.executions()), _state_of(engine)))
        elif op == "stop":
            return


# -- parent --------------------------------------------------------------------------------------
_ERRORS = {"BadChunkError": BadChunkError, "StreamStateLostError": StreamStateLostError}


class EngineWorker:
    """A StreamingEngine running in a child process (see the module docstring). Start it with
    `EngineWorker.start`; `close` stops the child."""

    def __init__(self, process, conn: multiprocessing.connection.Connection, facts: _Facts):
        self._process = process
        self._conn = conn
        self.geometry = facts.geometry
        self.model_info = facts.model_info
        self.capacity = facts.capacity
        self.max_batch = facts.max_batch
        self.startup_report = facts.startup_report
        self._executions = dict(facts.executions)
        self._allocator = SlotAllocator(facts.capacity)
        self._send_lock = threading.Lock()   # held while bytes go into the pipe (loop, writer thread)
        # Messages that could not be written at once: the writer thread writes them, in order, so
        # that no event loop ever blocks on a full pipe (a stopped worker reads nothing).
        self._outbox: collections.deque[bytes] = collections.deque()
        self._outbox_ready = threading.Condition()
        self._writer: threading.Thread | None = None
        self._poll = select.poll()
        self._poll.register(conn.fileno(), select.POLLOUT)
        self._request_lock = threading.Lock()  # one request and its reply at a time
        self._dead_reason: str | None = None
        self._closing = False
        self._buffers: dict[int, _SampleBuffer] = {}
        # Asynchronous steps (step_async): replies come back in the order of the requests.
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self._free_buffers: list[int] = list(range(STEPS_IN_FLIGHT - 1, -1, -1))
        self._room: asyncio.Semaphore | None = None
        self._reader: threading.Thread | None = None
        self.state = EngineState.READY

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @classmethod
    def start(cls, factory: str, cfg: EngineConfig, options: ChildOptions | None = None) -> EngineWorker:
        """Spawn the child, wait until its engine is built. Raises EngineError with the child's
        reason when it cannot start (or exits first)."""
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state, no locks held
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(target=_child_main, args=(child, factory, cfg, options or ChildOptions()),
                              name="asr-engine-worker")
        process.start()
        child.close()
        try:
            while not parent.poll(0.2):
                if not process.is_alive():
                    raise EngineError(f"the engine worker process exited with status {process.exitcode} before it was ready")
            kind, payload = parent.recv()
        except (EOFError, OSError) as exc:
            process.join(5)
            raise EngineError(f"the engine worker process exited with status {process.exitcode} before it was ready") from exc
        except BaseException:
            process.kill()
            process.join(5)
            raise
        if kind != "hello":
            process.join(5)
            raise EngineError(payload)
        worker = cls(process, parent, payload)
        # The child ignores SIGTERM and waits for its pipe to close; at interpreter exit
        # multiprocessing joins its children before this object is gone, so close it first.
        atexit.register(worker.close)
        for index in range(STEPS_IN_FLIGHT):
            worker._attach_buffer(index)
        return worker

    def _attach_buffer(self, index: int) -> None:
        """Shared sample buffer `index`, sized for the largest step (every row a stream's first
        chunk, the longest). Without it (no file could be mapped), audio goes through the pipe."""
        try:
            buffer = _SampleBuffer.create(self.max_batch * self.geometry.samples_needed(0))
        except OSError as exc:
            log.warning("no shared sample buffer; step audio goes through the pipe", extra={"error": str(exc)})
            return
        try:
            self._request(("attach", index, buffer.path, buffer.samples))
            self._buffers[index] = buffer
        except EngineError as exc:
            if self._dead_reason is not None:
                raise
            log.warning("the engine worker could not map the shared sample buffer; step audio goes through "
                        "the pipe", extra={"error": str(exc)})
        finally:
            buffer.unlink()

    # -- slots (event loop) ---------------------------------------------------------------------
    def acquire_slot(self) -> int:
        slot = self._allocator.acquire()
        try:
            self._send(("claim", slot))
        except EngineError:
            self._allocator.release(slot)
            raise
        return slot

    def release_slot(self, slot: int) -> None:
        self._allocator.release(slot)
        try:
            self._send(("release", slot))
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
            packed, replied_at = self._exchange(_pack_step(plan, self._buffers.get(0), 0))
            return _unpack_result(packed, sent_at, replied_at)

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

        reply = loop.create_future()
        sent = False
        try:
            sent_at = time.monotonic()
            message = _pack_step(plan, self._buffers.get(index), index)
            self._start_reader(loop)
            self._waiting.append(reply)
            try:
                self._send(message)
            except EngineError:
                self._waiting.remove(reply)
                raise
            sent = True
            # Shielded: a cancelled caller leaves the request to finish, and its buffer stays
            # the worker's until the reply says the worker is done reading it.
            packed, replied_at = await asyncio.shield(reply)
        except BaseException:
            if sent and not reply.done():
                reply.add_done_callback(release)
            else:
                release()
            raise
        release()
        return _unpack_result(packed, sent_at, replied_at)

    def _start_reader(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._reader is not None:
            return
        if self._dead_reason is not None:
            raise EngineError(self._dead_reason)
        self._reader = threading.Thread(target=self._read_replies, args=(loop,), name="engine-worker-replies",
                                        daemon=True)
        self._reader.start()

    def _read_replies(self, loop: asyncio.AbstractEventLoop) -> None:
        """The reader thread: each reply, as bytes, to the loop; the pipe's end fails what waits."""
        while True:
            try:
                data = self._conn.recv_bytes()
            except (EOFError, OSError):
                call_soon_from_thread(loop, self._fail_waiting)
                return
            call_soon_from_thread(loop, self._deliver, data, time.monotonic())

    def _deliver(self, data: bytes, replied_at: float) -> None:
        """On the loop: the oldest waiting step gets its reply (the worker answers in order)."""
        future = self._waiting.popleft()
        try:
            future.set_result((self._result_of(marshal.loads(data)), replied_at))
        except EngineError as exc:
            future.set_exception(exc)

    def _fail_waiting(self) -> None:
        reason = self._died()
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(EngineError(reason))

    def warmup(self) -> str:
        return self._request(("warmup",))

    def _request(self, message: tuple):
        with self._request_lock:
            return self._exchange(message)[0]

    def _exchange(self, message: tuple) -> tuple[object, float]:
        """Send a request and wait for its reply: its value and when it arrived. The caller
        holds the request lock."""
        if self._reader is not None:
            raise EngineError("a blocking request after asynchronous steps began: the reply reader owns the pipe")
        self._send(message)
        try:
            reply = marshal.loads(self._conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise EngineError(self._died()) from exc
        return self._result_of(reply), time.monotonic()

    def _result_of(self, reply: tuple):
        """A reply's value, or its error raised as the type the engine raised."""
        status, *rest = reply
        if status == "ok":
            value, self._executions, state = rest
            self._note_state(state)
            return value
        name, message_text, stream_ids, batch_size, self._executions, state = rest
        self._note_state(state)
        if name == "EngineOverloadedError":
            raise EngineOverloadedError(message_text, batch_size)
        if name in _ERRORS:
            raise _ERRORS[name](message_text, stream_ids)
        if name == "PoolExhaustedError":
            raise PoolExhaustedError(message_text)
        raise EngineError(message_text if name == "EngineError" else f"{name}: {message_text}")

    def _note_state(self, state: str | None) -> None:
        if state == EngineState.DEAD.value:
            self.state = EngineState.DEAD

    def _send(self, message: tuple) -> None:
        """Send without blocking: written at once when nothing waits before it and the pipe has
        room for it, else queued for the writer thread. A worker that stopped reading (hung,
        SIGSTOP) thus fills the queue, not the event loop's time."""
        if self._dead_reason is not None:
            raise EngineError(self._dead_reason)
        data = bytes(_ForkingPickler.dumps(message))
        if self._send_lock.acquire(blocking=False):
            try:
                # A Unix socket reports POLLOUT while at most a quarter of its buffer is in use:
                # a message this small then goes in without waiting.
                if not self._outbox and len(data) <= _DIRECT_SEND_BYTES and self._poll.poll(0):
                    self._conn.send_bytes(data)
                    return
            except (OSError, ValueError) as exc:  # BrokenPipeError; ValueError: the pipe was closed
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
        """The writer thread: queued messages into the pipe, in order (blocking writes)."""
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
                        self._conn.send_bytes(data)
                    except (OSError, ValueError):  # the worker is gone; the watcher reports it
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
        try:
            self._send(("stop",))
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
        self._conn.close()

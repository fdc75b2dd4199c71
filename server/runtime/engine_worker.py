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
other than the scheduler) is copied into a buffer both processes map (`SampleBuffer`), the
rows one after another at the message's offsets. When
the audio went through the link, the 1-5 MB of a large step went in socket-buffer-sized
writes, and between writes the engine thread waited for the interpreter lock the event loop held:
on an H100 at 1,920 streams (560 ms) the scheduler waited 44.9 ms for steps that took 23.2 ms
inside the engine (asr_step_seconds against asr_engine_step_seconds, bench/RESULTS.md). There
are two buffers: the scheduler keeps two steps submitted, and `step_async` sends both, so the
worker starts the second the moment it has replied to the first.

Child side (server.runtime.worker_process; the codec both sides share: server.runtime.worker_link):
`child_main` reads `Configure` (the engine factory, as `asr-server
--engine-factory` names it, the EngineConfig and the logging and GC options), builds the engine,
sends the `Hello` handshake, then answers requests in order until the link closes. A frame it
cannot read closes the link (logged), and the child exits. It ignores SIGINT and SIGTERM: the
parent decides when it stops (a Ctrl-C reaches the whole process group, and the parent's drain
still needs it).

With two steps in flight the child overlaps them (`ReadAhead`, `begin_step`, `finish_step`): while the
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
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from engines.api import (BadChunkError, EngineError, EngineOverloadedError, EngineState, PoolExhaustedError, StepPlan,
                         StepResult, StreamStateLostError)
from engines.config import EngineConfig
from engines.sample_ring import SampleRing, ring_width
from engines.slot_allocator import SlotAllocator
from server.runtime import wire as w
from server.runtime.worker_link import Link, SampleBuffer, pack_step, unpack_result
from server.runtime.worker_process import child_main
from server.scheduling.loop_calls import call_soon_from_thread

log = logging.getLogger("nemostream.engine_worker")
_DIRECT_SEND_BYTES = 16 << 10  # larger frames (a step with its audio inline) go by the writer thread
STEPS_IN_FLIGHT = 2  # asynchronous steps sent at once (the scheduler's pipeline depth is 2)


@dataclass(frozen=True)
class ChildOptions:
    """How the child sets itself up: logging as the parent's, and the garbage collector's
    policy after warm-up (server.runtime.gc_policy), since the child allocates per step too."""

    log_level: str = "INFO"
    log_format: str = "text"
    gc_freeze: bool = True
    gc_threshold: tuple[int, int, int] | None = None


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


_ERRORS = {"BadChunkError": BadChunkError, "StreamStateLostError": StreamStateLostError}


class EngineWorker:
    """A StreamingEngine running in a child process (see the module docstring). Start it with
    `EngineWorker.start`; `close` stops the child."""

    def __init__(self, process, link: Link, hello: w.Hello):
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
        self._buffers: dict[int, SampleBuffer] = {}
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
        process = ctx.Process(target=child_main, args=(child,), name="asr-engine-worker")
        try:
            process.start()
        finally:
            child.close()
        link = Link(parent, w.FROM_WORKER)
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
            buffer = SampleBuffer.create(self.max_batch * self.geometry.samples_needed(0))
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
            message = pack_step(plan, self._buffers.get(0), 0, self._new_id(), self.sample_ring)
            done, replied_at = self._exchange(message)
            return unpack_result(done, plan, sent_at, replied_at)

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
            message = pack_step(plan, self._buffers.get(index), index, request, self.sample_ring)
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
        return unpack_result(done, plan, sent_at, replied_at)

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

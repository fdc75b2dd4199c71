"""The engine worker's link, as both of its ends speak it: the blocking reader of frames (`Link`,
the child's, and the parent's before its reply thread starts), the sample buffer both processes
map, and the codec of a step and its reply, from a StepPlan to the typed wire's `Step` and from
the `StepDone` back to a StepResult, as columns (server.runtime.engine_worker says why columns,
and why the audio goes as spans of the shared sample ring).
"""

from __future__ import annotations

import collections
import dataclasses
import mmap
import os
import select
import socket
import tempfile
import time

import numpy as np

from engines.api import BadChunkError, EngineError, EngineState, ResultColumns, RowSamples, StepPlan, StepResult
from engines.sample_ring import RingSamples, SampleRing
from server.runtime import wire as w


class SampleBuffer:
    """float32 samples in a file both processes map (in /dev/shm where there is one). The parent
    creates it and unlinks the name once the child has mapped it; the mappings stay."""

    def __init__(self, path: str, samples: int):
        self.path = path
        self.samples = samples
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), samples * 4)
        self.array = np.frombuffer(self._map, dtype=np.float32)

    @classmethod
    def create(cls, samples: int) -> SampleBuffer:
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


class Link:
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


NOTHING = object()  # Link.poll: no whole message has arrived yet


class ChildSlots:
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


def pack_step(plan: StepPlan, buffer: SampleBuffer | None, index: int, request: int,
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


def unpack_step(step: w.Step, buffers: dict, slots: ChildSlots) -> StepPlan:
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


def step_reply(request: int, plan: StepPlan, result: StepResult, slots: ChildSlots,
               clocks: tuple[float, float, float], engine) -> w.StepDone:
    """A step's reply: the result's columns as they are (an engine that answers with
    StreamUpdate rows has them laid out as columns here). When the rows are the plan's, in its
    order (the engine contract), the parent takes stream ids and slots from its own plan."""
    c = result.columns
    same = c.stream_ids == plan.stream_ids and np.array_equal(c.slots, plan.slots)
    ids = None if same else list(c.stream_ids)
    parent_slots = None if same else w.as_column(slots.parent_slots(c.slots), w.I64)
    return w.StepDone(request, result.engine, result.timings, (*clocks, time.monotonic()), dict(engine.executions()),
                      state_of(engine), w.as_column(c.is_final, w.U8), w.as_column(c.frames_decoded, w.I64),
                      w.as_column(c.audio_seconds, w.F64), list(c.text_delta), w.as_column(c.token_offsets, w.I64),
                      w.as_column(c.token_ids, w.I64), list(c.token_pieces), w.as_column(c.token_frames, w.I64),
                      c.starts, c.ends, ids, parent_slots)


def unpack_result(done: w.StepDone, plan: StepPlan, sent_at: float, replied_at: float) -> StepResult:
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


def state_of(engine) -> str | None:
    state = getattr(engine, "state", None)
    return state.value if isinstance(state, EngineState) else None

"""The one wire between the server's processes: typed messages (msgspec Structs, encoded as
msgpack) in length-prefixed frames. Two links use it (docs/SCALING.md):

  - frontend <-> engine host, over a Unix socket per frontend (server.runtime.remote_scheduler,
    server.runtime.engine_host): streams' control, audio and results, metrics, the engine's state;
  - engine host's scheduler <-> engine worker process, over a socket pair (server.runtime.engine_worker):
    slots, steps and their replies. A step's audio does not travel here: it goes through a
    shared-memory sample buffer, and the step message names the buffer.

A frame is a 4-byte big-endian length and a msgpack array of messages: a writer sends everything
one event-loop iteration produced as one frame, so one syscall and one decode cover many streams.
A length over MAX_FRAME is refused before anything is allocated for it.

Every message is an array whose first element is its type's tag (`array_like=True`: no field
names on the wire, about the size and speed of the positional tuples this wire replaced). Each
link direction has a decoder that accepts only that direction's messages, so an unknown tag, a
field of the wrong type or a truncated body is a WireError: the reader closes that link and logs
the reason, never guesses. A reply names the request it answers (`id`); an Error message is the
reply that failed. The first message on a link is the Hello handshake (protocol version, the
sender's role, what the other side must know of the engine), which the receiver checks.

This module imports no server code above it (only server.scheduling.row_columns, a leaf, for
the Rows it carries): every process role uses it.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any, TypeVar, Union

import msgspec
import numpy as np

from engines.api import EndpointingParams, ModelInfo, StepTimings
from engines.config import EngineConfig
from engines.geometry import ChunkGeometry
from server.scheduling.row_columns import RowColumns

T = TypeVar("T")
PROTOCOL_VERSION = 4
HEADER = struct.Struct("!I")
MAX_FRAME = 256 << 20  # a corrupt length must not make the reader allocate without bound

# Hello.role: who sent the handshake
ROLE_ENGINE_HOST = "engine-host"      # to a frontend
ROLE_ENGINE_WORKER = "engine-worker"  # to the scheduler that started it


class WireError(ConnectionError):
    """A frame that cannot be read (bad length, malformed or truncated body, unknown or unexpected
    message) or a failed handshake: the link it came on is closed, with this as the reason."""


class Message(msgspec.Struct, array_like=True, gc=False):
    """Base of every message (gc=False: messages hold no reference cycles, and the collector
    need not track the thousands a second this wire carries)."""


# -- the handshake and errors (both links) --------------------------------------------------
class RingInfo(msgspec.Struct, array_like=True, gc=False):
    """A sample ring another process can map (engines.sample_ring.SampleRing.attach)."""

    path: str
    slots: int
    width: int


class Hello(Message, tag=20):
    """First message on a link, from the side that owns the engine. The fields are what the
    receiver needs of the engine: its model, chunk geometry, capacity and largest batch; from the
    engine host also its warmed-up engine's name and its scheduler settings (SchedulerConfig's
    fields), from an engine worker its start-up report and execution counters."""

    version: int
    role: str
    model_info: ModelInfo
    geometry: ChunkGeometry
    capacity: int
    max_batch: int
    engine_name: str = ""
    scheduler: dict[str, Union[int, float]] = {}
    startup_report: Union[dict[str, Any], None] = None
    executions: dict[str, int] = {}
    # From the engine host: its engine cores' sample rings (core i's at i), which a frontend
    # maps to write its streams' audio into (none: the frontends send audio in messages).
    rings: list[RingInfo] = []


def plain_report(report: dict | None) -> dict | None:
    """An engine's start-up report (for health, logs and metrics) as plain values the wire
    carries: numpy scalars as numbers, anything else it cannot encode (a path, a library's
    object) as its text, so an odd value in a report never stops a worker from starting."""
    if report is None:
        return None

    def hook(obj):
        item = getattr(obj, "item", None)  # numpy and torch scalars
        if callable(item):
            try:
                return item()
            except (TypeError, ValueError):
                pass
        return str(obj)

    return msgspec.to_builtins(report, enc_hook=hook, str_keys=True)


def check_hello(message: object, role: str) -> Hello:
    """The first message of a link, checked: a Hello from `role` in this protocol version."""
    if not isinstance(message, Hello):
        raise WireError(f"the link's first message is {type(message).__name__}, not the Hello handshake")
    if message.version != PROTOCOL_VERSION:
        raise WireError(f"the peer speaks wire protocol version {message.version}, this process {PROTOCOL_VERSION}")
    if message.role != role:
        raise WireError(f"the peer's role is {message.role!r}, expected {role!r}")
    return message


class Error(Message, tag=26):
    """A request that failed (`id`: the request's; 0 when the link itself failed and is being
    closed). `name` is the exception's type (the worker raises the same type on the other side);
    stream_ids and batch_size carry what BadChunkError and EngineOverloadedError hold; executions
    and state are the engine's counters and EngineState value at the time."""

    id: int
    name: str
    message: str
    stream_ids: tuple[str, ...] = ()
    batch_size: Union[int, None] = None
    executions: Union[dict[str, int], None] = None
    state: Union[str, None] = None


# -- frontend -> engine host -----------------------------------------------------------------
class Open(Message, tag=1):
    key: str                 # the frontend's stream id (random hex: unique across frontends)
    label: str
    finalize_at_limit: bool
    endpointing: Union[EndpointingParams, None]
    client: Union[str, None]  # the client's identity when streams per client are limited
    # The frontend writes the stream's audio into its engine core's sample ring (answered with
    # Opened) rather than sending it in Audio messages.
    ring: bool = False


class Audio(Message, tag=2):
    key: str
    samples: bytes  # float32 at the model's rate


class End(Message, tag=3):
    """The client's audio ended. For a stream written into the ring, sent once every sample is
    written and counted (Written): the frontend writes no more of it."""

    key: str


class Fail(Message, tag=4):
    """The frontend failed the stream (bad audio, a client that does not read, cancellation)."""

    key: str
    kind: str  # ErrorKind value
    message: str


class Close(Message, tag=5):
    """The call is over: the engine frees the stream."""

    key: str


class Ack(Message, tag=6):
    """The frontend's servicer took n events (the response window)."""

    key: str
    n: int


class Ready(Message, tag=7):
    """The frontend's gRPC port is open."""

    name: str


class Rpc(Message, tag=8):
    """An RPC finished: counted in the engine host's metrics registry."""

    method: str
    code: str


class Refused(Message, tag=9):
    reason: str


class AudioSeconds(Message, tag=10):
    seconds: float  # audio received since the last one


class Gc(Message, tag=11):
    generation: str
    seconds: float


class Sync(Message, tag=12):
    """Answered with Synced(id) once everything sent before it is applied."""

    id: int


class EndUtterance(Message, tag=13):
    """The client asks for the open utterance's final (Scheduler.end_utterance)."""

    key: str


class UtteranceFinal(Message, tag=14):
    """A frontend closed an utterance with its final: how long after the audio (or the client's
    request) that closed it, for the engine host's metrics."""

    closed_by: str  # UtteranceEnd value
    seconds: float


class ChunksWritten(Message, tag=17):
    """A frontend's asr_chunk_written_seconds since the last one: per-bucket counts (not
    cumulative, +Inf last) and their sum, sent every METRICS_FORWARD_PERIOD_S while there are some."""

    counts: bytes  # int64 [buckets + 1]
    seconds: float


class Written(Message, tag=15):
    """Streams' audio written into engine core `core`'s sample ring: the stream in ring row
    slots[i] has totals[i] samples there now (one message a frame for every stream written).
    A slot this frontend was not given (Opened), or is no longer writing, is a WireError."""

    core: int
    slots: bytes   # int64 [streams]
    totals: bytes  # int64 [streams]


class Stopped(Message, tag=16):
    """The frontend writes no more of this stream's audio (it saw the engine end or fail it):
    its slot may go back to the pool once the stream is done. End, Fail and Close say the same."""

    key: str


# -- engine host -> frontend -----------------------------------------------------------------
class Opened(Message, tag=27):
    """The stream (Open with ring) writes its audio into row `slot` of engine core `core`'s
    sample ring (Hello.rings), stream sample s at column s % width, never more than the ring's
    width past what the engine has consumed (the rows' counts)."""

    key: str
    core: int
    slot: int


class Rows(Message, tag=21):
    """A step's answered chunks of this frontend's streams: row i is keys[i]'s chunk, its values
    in `columns` (server.scheduling.row_columns.RowColumns). The frontend keeps each stream's
    utterances and makes its events (server.scheduling.utterances.chunk_event), so the engine
    process makes no object per row."""

    keys: list[str]
    columns: RowColumns

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.columns):
            raise ValueError(f"Rows: {len(self.keys)} keys for {len(self.columns)} rows")


class Failed(Message, tag=22):
    key: str
    consumed: int
    kind: str  # ErrorKind value
    message: str


class Cut(Message, tag=23):
    """The engine ended the stream's audio at a duration limit."""

    key: str
    end_reason: str


class State(Message, tag=24):
    engine_name: str
    executions: dict[str, int]
    max_batch: int
    slots_in_use: int
    active_streams: int
    dead_reason: Union[str, None]
    draining: bool


class Synced(Message, tag=25):
    id: int


# -- scheduler -> engine worker --------------------------------------------------------------
class Configure(Message, tag=40):
    """First message to a new worker: the engine to build (`factory`, as --engine-factory names
    it) and how the worker sets itself up (server.runtime.engine_worker.ChildOptions)."""

    factory: str
    config: EngineConfig
    log_level: str
    log_format: str
    gc_freeze: bool
    gc_threshold: Union[tuple[int, int, int], None]


class Attach(Message, tag=41):
    """Map shared sample buffer `index` (a file of `samples` float32)."""

    id: int
    index: int
    path: str
    samples: int


class AttachRing(Message, tag=47):
    """Map the scheduler's sample ring (engines.sample_ring): a file of `slots` x `width`
    float32, row i the audio of the scheduler's slot i. A step then names its rows' spans."""

    id: int
    path: str
    slots: int
    width: int


class Claim(Message, tag=42):
    slot: int  # the scheduler's slot number, mapped onto one of the worker engine's own


class Release(Message, tag=43):
    slot: int


class Warmup(Message, tag=44):
    id: int


class Step(Message, tag=45):
    """One engine step, as the plan's columns (engines.api.StepPlan.from_columns). The array
    columns are numpy arrays as raw bytes, each field's dtype fixed here (`column` reads them
    back and checks their length). The rows' audio is named by `spans` when it lies in the
    sample ring the worker mapped (AttachRing): row i is stream samples [spans[2i], spans[2i+1])
    of ring row slots[i]. Otherwise row i's samples are at [offsets[i], offsets[i + 1]) of
    shared buffer `buffer`, or of `audio` (float32 bytes) when no buffer was attached or the
    step does not fit it. Endpointing settings ride on first chunks only."""

    id: int
    buffer: int
    stream_ids: list[str]
    slots: bytes    # int64 [rows]: the scheduler's slots
    offsets: bytes  # int64 [rows + 1]: the rows' samples in the step's audio (empty with spans)
    flags: bytes    # uint8 [rows]: FIRST | AUDIO_ENDED | NEW_UTTERANCE
    endpointing: dict[int, EndpointingParams]  # row -> the stream's endpointing (first chunks that have it)
    audio: Union[bytes, None] = None
    spans: Union[bytes, None] = None  # int64 [rows, 2]: each row's start and end in the sample ring


# Step.flags bits
FIRST, AUDIO_ENDED, NEW_UTTERANCE = 1, 2, 4
I64, F64, U8 = np.dtype("<i8"), np.dtype("<f8"), np.dtype("u1")


def column(data: bytes, dtype: np.dtype, n: int, name: str) -> np.ndarray:
    """An array column of a message (read-only, a view of `data`): a WireError unless it holds
    exactly `n` entries."""
    if len(data) != n * dtype.itemsize:
        raise WireError(f"column {name} has {len(data)} bytes, not {n} entries of {dtype.itemsize}")
    return np.frombuffer(data, dtype)


def as_column(values, dtype: np.dtype) -> bytes:
    """An array as a message's column (the bytes `column` reads)."""
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


class Stop(Message, tag=46):
    pass


# -- engine worker -> scheduler --------------------------------------------------------------
class Done(Message, tag=50):
    """A request other than a step succeeded; `value` (the warmed-up engine's name, for Warmup)."""

    id: int
    value: Union[str, None]
    executions: dict[str, int]
    state: Union[str, None]


class StepDone(Message, tag=52):
    """A step's result, as its columns (engines.api.ResultColumns; array columns as in Step).
    Row i's tokens are [token_offsets[i], token_offsets[i + 1]) of the token columns; starts and
    ends name the rows that have endpoint events. The rows are the plan's, in its order, unless
    `stream_ids` and `slots` (int64, the scheduler's slots) say otherwise. clocks: the worker's
    CLOCK_MONOTONIC readings (request taken, step started, step ended, reply sent), for the way
    there and back in StepTimings."""

    id: int
    engine: str
    timings: StepTimings
    clocks: tuple[float, float, float, float]
    executions: dict[str, int]
    state: Union[str, None]
    is_final: bytes        # uint8 [rows]
    frames_decoded: bytes  # int64 [rows]
    audio_seconds: bytes   # float64 [rows]
    text_delta: list[str]  # [rows]
    token_offsets: bytes   # int64 [rows + 1]
    token_ids: bytes       # int64 [tokens]
    token_pieces: list[str]
    token_frames: bytes    # int64 [tokens]
    starts: dict[int, tuple[int, ...]]
    ends: dict[int, tuple[int, ...]]
    stream_ids: Union[list[str], None] = None
    slots: Union[bytes, None] = None


FRONTEND_TO_ENGINE = Union[Open, Audio, End, Fail, Close, Ack, Ready, Rpc, Refused, AudioSeconds, Gc, Sync,
                           EndUtterance, UtteranceFinal, ChunksWritten, Written, Stopped, Error]
ENGINE_TO_FRONTEND = Union[Hello, Rows, Failed, Cut, State, Synced, Opened, Error]
TO_WORKER = Union[Configure, Attach, AttachRing, Claim, Release, Warmup, Step, Stop]
FROM_WORKER = Union[Hello, Done, StepDone, Error]


# -- frames ------------------------------------------------------------------------------------
_encoder = msgspec.msgpack.Encoder()


def encode_frame(messages: list) -> bytearray:
    """One frame: the length, then the messages as one msgpack array (encoded in place after
    the header, no second copy)."""
    frame = bytearray(HEADER.size)
    _encoder.encode_into(messages, frame, HEADER.size)
    size = len(frame) - HEADER.size
    if size > MAX_FRAME:
        raise WireError(f"a frame of {size} bytes exceeds the limit of {MAX_FRAME}")
    HEADER.pack_into(frame, 0, size)
    return frame


class Decoder:
    """Frame bodies into the messages one link direction may carry (`kinds`: one of the unions
    above); anything else is a WireError naming what was wrong."""

    def __init__(self, kinds):
        self._decoder = msgspec.msgpack.Decoder(list[kinds])

    def decode(self, body) -> list:
        try:
            return self._decoder.decode(body)
        except msgspec.DecodeError as exc:  # ValidationError included: unknown tag, wrong field
            raise WireError(f"malformed frame ({len(body)} bytes): {exc}") from None


class FrameSplitter:
    """Bytes as they arrive -> complete frames, in one buffer that is reused: the bytes are read
    into it (`room`, then `filled`), and each complete frame's body is handed on as a view where
    it lies (`split`). The event-loop reader (FrameReader) and the worker link's blocking reader
    both use it, so the framing and the bound on lengths live in one place.

    Why one reused buffer: a frame of a busy link holds hundreds of kilobytes of audio, and a
    new buffer per read is fresh memory from the kernel each time (page faults and copies were
    a fifth of the engine process's CPU, bench/RESULTS.md)."""

    MIN_READ = 1 << 16  # room offered to each read

    def __init__(self, size: int = 1 << 20):
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = 0   # the first byte not yet split off
        self._end = 0     # the end of what has arrived
        self._want = 0    # the whole size of the frame that has begun arriving, once its header has

    @property
    def pending(self) -> int:
        """Bytes that arrived and are not yet part of a complete frame."""
        return self._end - self._start

    @property
    def capacity(self) -> int:
        return len(self._buf)

    def room(self) -> memoryview:
        """Where the next bytes go: at least MIN_READ bytes, and enough for the rest of a frame
        that has begun arriving (a frame larger than the buffer grows it)."""
        free = max(self.MIN_READ, self._want - self.pending)
        if len(self._buf) - self._end < free:
            pending = self.pending
            if pending + free <= len(self._buf):  # the partial frame moves to the front
                self._view[:pending] = self._view[self._start:self._end]
            else:
                bigger = bytearray(max(2 * len(self._buf), pending + free))
                bigger[:pending] = self._view[self._start:self._end]
                self._view.release()
                self._buf, self._view = bigger, memoryview(bigger)
            self._start, self._end = 0, pending
        return self._view[self._end:]

    def filled(self, n: int) -> None:
        """`n` bytes were written at the start of `room()`."""
        self._end += n

    def split(self, take: Callable[[memoryview], T], frames: list | None = None) -> list[T]:
        """`take` of each complete frame's body, appended to `frames` (a new list by default) as
        each is taken, so a take that raises leaves the frames before it there. The body is a
        view into the buffer, valid during the call (a decoder reads it in place, `bytes` copies
        it out). A WireError for a length over MAX_FRAME, before anything is allocated for it."""
        buf, view, pos, end = self._buf, self._view, self._start, self._end
        frames = [] if frames is None else frames
        self._want = 0
        while end - pos >= HEADER.size:
            (size,) = HEADER.unpack_from(buf, pos)
            if size > MAX_FRAME:
                raise WireError(f"frame of {size} bytes exceeds the limit of {MAX_FRAME}")
            body = pos + HEADER.size
            if end - body < size:
                self._want = HEADER.size + size
                break
            frames.append(take(view[body:body + size]))
            pos = body + size
            self._start = pos  # (a take that raises leaves the frames before it split off)
        if pos == end:
            self._start = self._end = 0
        return frames

    def fill_from(self, data: memoryview) -> memoryview:
        """Copy in as much of `data` as `room()` offers; the rest is returned (bytes that come
        from elsewhere than a socket read: tests, benchmarks)."""
        room = self.room()
        n = min(len(room), len(data))
        room[:n] = data[:n]
        self.filled(n)
        return data[n:]

    def feed(self, data, take: Callable[[memoryview], T]) -> list[T]:
        """Bytes from elsewhere: copied in, then split."""
        frames: list[T] = []
        data = memoryview(data)
        while True:
            data = self.fill_from(data)
            self.split(take, frames)
            if not data:
                return frames

    def check_end(self) -> None:
        """The connection ended: an error if it ended inside a frame."""
        if self.pending:
            raise WireError(f"connection closed inside a frame ({self.pending} bytes pending)")


class FrameWriter:
    """Collects messages and writes them as one frame per event-loop iteration: the first
    message of an iteration schedules the flush, the rest ride along.

    `min_interval_s` > 0 also spaces the frames: a flush comes at once when the last one is at
    least that old, else that long after the last one. An idle link's message goes at once; a
    busy one's messages wait at most the interval and go together. Why: a frontend's loop turns
    over once per gRPC message, so each chunk of audio left in a frame of its own (2.7 messages
    a frame at 700 streams), and every frame costs the reading process a wake-up of its event
    loop, the engine process's loop being what binds (bench/RESULTS.md, runs 29-31)."""

    def __init__(self, writer: asyncio.WriteTransport, min_interval_s: float = 0.0):
        self._writer = writer
        self._pending: list = []
        self._scheduled = False
        self._min_interval = min_interval_s
        self._last_flush = float("-inf")
        self.frames = 0  # frames written, for tests and counts
        self.closed = False

    def send(self, message: Message) -> None:
        if self.closed:
            return
        self._pending.append(message)
        if not self._scheduled:
            self._scheduled = True
            loop = asyncio.get_running_loop()
            wait = self._last_flush + self._min_interval - loop.time() if self._min_interval else 0.0
            if wait > 0:
                loop.call_later(wait, self.flush)
            else:
                loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending or self.closed:
            return
        if self._min_interval:
            self._last_flush = asyncio.get_running_loop().time()
        frame = encode_frame(self._pending)
        self._pending = []
        if self._writer.is_closing():
            self.closed = True
            return
        self._writer.write(frame)
        self.frames += 1

    def close(self) -> None:
        self.flush()
        self.closed = True
        self._writer.close()


class FrameReader(asyncio.BufferedProtocol):
    """A link's reading end on the event loop: the kernel writes into the FrameSplitter's buffer
    and each complete frame is decoded where it lies. `read_frames` returns every frame decoded
    since the last call: one await covers all that a busy peer wrote meanwhile (the engine host
    reads N frontends).

    Why a protocol and not an asyncio.StreamReader: through a StreamReader each byte of audio a
    frontend sent was copied five times in the engine process (the loop's bytes, the reader's
    buffer, the read's bytes, the frame buffer, the decoded field), in buffers big enough to be
    fresh memory each time; copies and page faults were a fifth of that process's CPU at 2,000
    streams (perf, bench/RESULTS.md). Here the kernel's copy and the decoded field are the only
    two.

    Reading pauses while more than READY_FRAMES_MAX decoded frames wait to be read, so a reader
    that falls behind holds its peer back (the kernel's socket buffer, then the peer's writes)
    instead of growing without bound. `feed` and `feed_eof` put bytes in without a transport."""

    READY_FRAMES_MAX = 256

    def __init__(self, kinds, size: int = 1 << 20):
        self._decoder = Decoder(kinds)
        self._frames = FrameSplitter(size)
        self._ready: list[list] = []
        self._error: BaseException | None = None
        self._ended = False  # the peer closed its end, or the connection was lost
        self._lost: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._paused = False
        self.transport: asyncio.Transport | None = None
        self.on_connected: Callable[[], None] | None = None

    @property
    def buffer_size(self) -> int:
        return self._frames.capacity

    # -- asyncio.BufferedProtocol -----------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.on_connected is not None:
            self.on_connected()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._frames.room()

    def buffer_updated(self, nbytes: int) -> None:
        self._frames.filled(nbytes)
        self._split()

    def _split(self) -> None:
        """Decode what has arrived; pause reading while too many frames wait to be read."""
        if self._error is None:
            try:
                self._frames.split(self._decoder.decode, self._ready)
            except WireError as exc:
                self._error = exc
        if len(self._ready) > self.READY_FRAMES_MAX and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._ended = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: BaseException | None) -> None:
        self._ended = True
        self._lost = exc
        self._wake()

    # -- without a transport (tests) -------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        data = memoryview(data)
        while data:
            data = self._frames.fill_from(data)
            self._split()

    def feed_eof(self) -> None:
        self.eof_received()

    # -- the reader's side --------------------------------------------------------------------------
    async def read_frames(self) -> list[list] | None:
        """The frames decoded so far (at least one), each a list of messages, or None at a clean
        end of the connection. Raises WireError for a frame that cannot be read (the frames
        before it are returned first), and the connection's error when it was lost."""
        while True:
            if self._ready:
                frames, self._ready = self._ready, []
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return frames
            if self._error is not None:
                raise self._error
            if self._ended:
                if self._lost is not None:
                    raise self._lost
                self._frames.check_end()
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


async def open_link(path: str, kinds) -> FrameReader:
    """Connect to a Unix socket; the reader's `transport` writes (FrameWriter(reader.transport))."""
    _, reader = await asyncio.get_running_loop().create_unix_connection(lambda: FrameReader(kinds), path)
    return reader


async def serve_links(path: str, kinds, handle: Callable[[FrameReader], Any]) -> asyncio.AbstractServer:
    """Listen on a Unix socket; each connection runs `handle(reader)` as a task of its own."""
    loop = asyncio.get_running_loop()

    def accepted() -> FrameReader:
        reader = FrameReader(kinds)
        reader.on_connected = lambda: loop.create_task(handle(reader))
        return reader

    return await loop.create_unix_server(accepted, path=path)

"""The frontend <-> engine process wire: length-prefixed frames, each a marshal-encoded list
of messages, over a Unix socket (docs/SCALING.md).

Why this shape: one process's event loop answers about 3,000 chunks/s of gRPC work, so the
service runs several gRPC frontend processes around one engine process. Between them a frame
carries every message one loop iteration produced, so one syscall and one decode cover many
streams. Messages are tuples of plain values (marshal, not pickle: fast, and it builds no
objects but ints, floats, strings, bytes, tuples, lists and dicts). Audio travels as float32
bytes at the model's rate. Both ends are processes this server starts itself.

Every message starts with its kind; the rest is positional. Stream keys are the frontend's
stream ids (unique across frontends: random hex).
"""

from __future__ import annotations

import asyncio
import marshal
import struct

from engines.api import TokenEvent
from server.stream_events import ChunkResult, ErrorKind, StreamEvent, StreamFailure, Utterance, UtteranceEnd

# frontend -> engine
OPEN = 1       # (OPEN, key, label, finalize_at_limit, endpointing as a tuple or None, client identity or None)
AUDIO = 2      # (AUDIO, key, float32 bytes)
END = 3        # (END, key)
FAIL = 4       # (FAIL, key, ErrorKind value, message): the frontend failed the stream
CLOSE = 5      # (CLOSE, key): the call is over; the engine frees the stream
ACK = 6        # (ACK, key, n): the frontend's servicer took n events (the response window)
READY = 7      # (READY, frontend name): its gRPC port is open
RPC = 8        # (RPC, method, code): metrics of the transport, counted in the engine's registry
REFUSED = 9    # (REFUSED, reason)
AUDIO_S = 10   # (AUDIO_S, seconds): audio received since the last one
GC = 11        # (GC, generation, seconds): a garbage collection in the frontend
SYNC = 12      # (SYNC, token): answered with SYNCED once everything sent before it is applied
EOU = 13       # (EOU, key): the client asks for the open utterance's final (Scheduler.end_utterance)
# engine -> frontend
HELLO = 20     # (HELLO, pickled EngineFacts): first frame on a connection
RESULT = 21    # (RESULT, key, consumed samples, chunk_index, new_text, is_final, audio_seconds,
#                 audio_ready_at, utterance_index, finals): the frontend keeps the open utterance's
#                 text (new_text appended; after a final it restarts from new_text), so the text
#                 so far is not resent per chunk. finals: ((index, transcript, tokens as
#                 ((id, piece, frame), ...), start_seconds, end_seconds, closed_by), ...)
FAILED = 22    # (FAILED, key, consumed samples, ErrorKind value, message)
CUT = 23       # (CUT, key, end_reason): the engine ended the stream's audio at a duration limit
SYNCED = 25    # (SYNCED, token)
STATE = 24     # (STATE, engine_name, executions, max_batch, slots_in_use, active_streams, dead_reason, draining)

_HEADER = struct.Struct("!I")
MAX_FRAME = 256 << 20  # a corrupt length must not make the reader allocate without bound


class FrameWriter:
    """Collects messages and writes them as one frame per event-loop iteration: the first
    message of an iteration schedules the flush, the rest ride along."""

    def __init__(self, writer: asyncio.StreamWriter):
        self._writer = writer
        self._pending: list[tuple] = []
        self._scheduled = False
        self.closed = False

    def send(self, message: tuple) -> None:
        if self.closed:
            return
        self._pending.append(message)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending or self.closed:
            return
        body = marshal.dumps(self._pending)
        self._pending = []
        if self._writer.is_closing():
            self.closed = True
            return
        self._writer.write(_HEADER.pack(len(body)) + body)

    def close(self) -> None:
        self.flush()
        self.closed = True
        self._writer.close()


class FrameReader:
    """Reads whatever the socket has and returns every complete frame in it: one await covers
    all the frames a busy peer wrote meanwhile (the engine process reads N frontends)."""

    def __init__(self, reader: asyncio.StreamReader):
        self._reader = reader
        self._buf = bytearray()

    async def read_frames(self) -> list[list[tuple]] | None:
        """The next complete frames (at least one), or None at a clean end of the connection."""
        while True:
            frames = self._parse()
            if frames:
                return frames
            data = await self._reader.read(1 << 20)
            if not data:
                if self._buf:
                    raise ConnectionError(f"connection closed inside a frame ({len(self._buf)} bytes pending)")
                return None
            self._buf += data

    def _parse(self) -> list[list[tuple]]:
        frames: list[list[tuple]] = []
        buf, pos, n = self._buf, 0, len(self._buf)
        with memoryview(buf) as view:
            while n - pos >= _HEADER.size:
                (size,) = _HEADER.unpack_from(buf, pos)
                if size > MAX_FRAME:
                    raise ConnectionError(f"frame of {size} bytes exceeds the limit of {MAX_FRAME}")
                if n - pos - _HEADER.size < size:
                    break
                start = pos + _HEADER.size
                messages = marshal.loads(view[start:start + size])
                if not isinstance(messages, list):
                    raise ConnectionError(f"a frame holds {type(messages).__name__}, not a list of messages")
                frames.append(messages)
                pos = start + size
        if pos:
            del buf[:pos]
        return frames


# -- events ----------------------------------------------------------------------------------
def encode_event(key: str, consumed: int, event: StreamEvent) -> tuple:
    if isinstance(event, StreamFailure):
        return (FAILED, key, consumed, event.kind.value, event.message)
    finals = tuple((u.index, u.transcript, tuple(map(tuple, u.tokens)),  # marshal takes plain tuples only
                    u.start_seconds, u.end_seconds, u.closed_by.value) for u in event.finals)
    return (RESULT, key, consumed, event.chunk_index, event.new_text, event.is_final, event.audio_seconds,
            event.audio_ready_at, event.utterance_index, finals)


def decode_failure(message: tuple) -> StreamFailure:
    _, key, _, kind, text = message
    return StreamFailure(key, ErrorKind(kind), text)


def decode_result(message: tuple, transcript: str) -> ChunkResult:
    """A RESULT message as the event the servicers know (stream id = the key); `transcript`:
    the open utterance's text so far, this message's new_text included."""
    _, key, _, index, new_text, is_final, audio_seconds, ready_at, utterance_index, finals = message
    return ChunkResult(stream_id=key, chunk_index=index, transcript=transcript, new_text=new_text,
                       is_final=is_final, audio_seconds=audio_seconds, audio_ready_at=ready_at,
                       utterance_index=utterance_index,
                       finals=tuple(Utterance(u_index, text, tuple(TokenEvent._make(t) for t in tokens), start, end,
                                              UtteranceEnd(closed_by))
                                    for u_index, text, tokens, start, end, closed_by in finals))

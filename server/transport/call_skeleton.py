"""One call's skeleton, for both APIs on the port: the native nemostream.v1 (server.transport.servicer)
and NVIDIA Riva's ASR API (server.transport.riva_servicer).

A call goes the same way whichever API it speaks, and this module owns that way once:

- StreamingRecognize reads the first request within the idle timeout (before any refusal: a
  server that ends the call before reading makes grpc.aio clients still writing it see INTERNAL,
  not our status), asks the scheduler for admission, opens the stream, then runs two halves: a
  reader task that decodes audio and pushes it (waiting while the stream has enough pending), and
  the handler writing responses while watching the stream (server.transport.unread_client). Any problem
  becomes the stream's failure, and the failure becomes the gRPC status of the same name
  (ErrorKind), counted in the metrics before it goes out. The stream's place is freed once.
- Recognize checks the whole request, takes its bytes from the Recognize budget, feeds the
  audio a piece at a time and answers with every final.

An API supplies only what differs (the `Api` protocol): its request checks and stream options,
its audio decoder, its responses (a `StreamWriter` per streaming call) and the words of its
status and log messages (`ApiNames`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from server.transport.call_limits import (RECOGNIZE_PIECE_BYTES, RecognizeBudget, RecognizeLimits, check_response_size,
                                client_of, status_message)
from server.transport.idle_read import IdleReads, next_within
from server.ops.metrics import ServerMetrics
from server.scheduling.scheduler import Scheduler, StreamHandle
from server.transport.security import REFUSAL_DRAIN_SECONDS, REFUSAL_QUIET_SECONDS, drain_requests, end_with_status
from server.transport.stream_config import ServedModel
from server.scheduling.stream_events import ChunkResult, ErrorKind, StreamError, StreamFailure, Utterance
from server.scheduling.stream_state import StreamStatus
from server.transport.unread_client import UnreadClient, WatchedWrites, abort_unread
from server.transport.wav_header import AudioError


# The trailing metadata that says why the server ended a stream the client had not ended
# (e.g. "maximum duration of 1 s of audio reached"): on the native and the Riva API alike.
END_REASON_KEY = "asr-end-reason"


@dataclass(frozen=True)
class TransportLimits:
    idle_timeout_s: float = 45.0             # no request from the client for this long ends the stream
    max_audio_message_bytes: int = 1 << 20   # per streamed audio message
    max_header_bytes: int = 1 << 16          # WAV header bytes before the data chunk
    max_send_bytes: int = 32 << 20           # the largest response (the server's send limit)
    recognize: RecognizeLimits = field(default_factory=RecognizeLimits)  # unary Recognize bytes in flight

    def __post_init__(self) -> None:
        if self.idle_timeout_s <= 0 or self.max_audio_message_bytes < 1 or self.max_header_bytes < 44:
            raise ValueError("idle_timeout_s > 0, max_audio_message_bytes >= 1, max_header_bytes >= 44 required")


@dataclass(frozen=True)
class ApiNames:
    """How one API names things in its status messages, metrics and logs."""

    log: logging.Logger
    log_prefix: str       # before each log message: "" or "riva "
    method_prefix: str    # of the metrics' method label: "" or "Riva/"
    request_type: str     # the streaming request message's full name
    config: str           # what the first request carries: "the config"
    audio: str            # what later requests carry: "audio"
    no_audio: str         # requests that carry no audio, in the idle status: "requests"


class Decoder(Protocol):
    """Audio bytes of one call -> mono float32 samples at the model's rate (AudioError if not)."""

    input_seconds: float

    def feed(self, data: bytes) -> Any: ...

    def finish(self) -> Any: ...


class StreamWriter:
    """One StreamingRecognize call's API half: what its requests carry and which responses its
    stream's events make. `call` gives it the stream (call.handle), the context, a watching
    write (call.write) and the early close (call.close)."""

    def __init__(self, call: StreamCall):
        self.call = call

    def audio_of(self, request) -> bytes | None:
        """A request after the first: its audio (b"" for a message that needs an answer but
        carries none), or None for one that carries nothing to decode. Raises StreamError for a
        request the API does not take there."""
        raise NotImplementedError

    def message(self, samples: int) -> None:
        """An audio message decoded to `samples` samples (called before they are pushed)."""

    async def run(self) -> None:
        """Write the stream's responses up to and with its final; raise StreamError for its failure."""
        raise NotImplementedError

    def taken_failure(self) -> StreamFailure | None:
        """A failure this writer already took from the stream ahead of its writes."""
        return None

    def log_counts(self) -> dict:
        """What the writer counted, for the 'stream closed' log line."""
        return {}

    def cancel(self) -> None:
        """The call is over: stop whatever the writer still waits on."""


class Api(Protocol):
    """What one API supplies to the skeleton."""

    names: ApiNames

    def stream_options(self, first) -> Any:
        """The first streaming request (None: the stream ended before one) -> the stream's
        options (with .label and .endpointing), or StreamError."""

    def stream_writer(self, call: StreamCall, options, first) -> StreamWriter: ...

    def recognize_options(self, request) -> Any:
        """A unary request -> its options, or StreamError."""

    def recognize_response(self, request, options, finals: list[Utterance], last: ChunkResult, stream_id: str): ...

    def decoder(self, options) -> Decoder: ...

    def log_fields(self, options, rpc: str) -> dict:
        """The API's own fields of the 'stream opened' log line."""


class _ReadFailed(StreamError):
    """The request stream itself broke (undecodable, idle): nothing more is read from it."""


async def settle_reader(reader: asyncio.Task | None, handle) -> None:
    """Before a status goes out, let the audio reader finish reading what the client still sends
    (it drains a bounded amount once the stream has failed or ended: server.transport.security's
    drain_requests). A grpc.aio client whose request writes race the status sees INTERNAL
    "Internal error from Core" instead of it (grpc/grpc#36066); a client that has half-closed
    sees the status the server sent."""
    if reader is None or reader.done():
        return
    if handle is not None:
        handle.state.audio_room.set()  # a reader waiting for room re-checks the stream's status
    await asyncio.wait((reader,), timeout=REFUSAL_DRAIN_SECONDS + 0.5)


async def client_gone(context) -> bool:
    """gRPC ends a request stream alike for a half-close and for a client that cancelled (or
    whose deadline passed), and the cancellation may reach the handler much later. Before
    refusing a stream for how it ended (no config, a partial last sample), ask the call itself:
    sending the initial metadata fails on a call the client has left. Not knowing (the metadata
    went out already) counts as still there."""
    if context.time_remaining() == 0:
        return True
    try:
        await context.send_initial_metadata(())
    except grpc.aio.UsageError:
        return False
    except Exception:  # noqa: BLE001 - core's ExecuteBatchError: the call is over
        return True
    return False


class StreamCall:
    """One StreamingRecognize call as the skeleton keeps it: its stream, its writer, whether its
    place is freed."""

    def __init__(self, calls: CallSkeleton, context):
        self.context = context
        self.handle: StreamHandle | None = None
        self.writer: StreamWriter | None = None
        self.started = time.monotonic()
        self.closed = False
        self._calls = calls
        self._writes: WatchedWrites | None = None  # made at the first write

    async def write(self, response, what: str = "response", ready_at: float | None = None) -> None:
        """Write one response, watching the stream (server.transport.unread_client). `ready_at`:
        the monotonic time the audio of the chunk this response answers first was complete; its
        latency to the write goes into asr_chunk_written_seconds."""
        limits = self._calls.limits
        check_response_size(response.ByteSize(), limits.max_send_bytes, what)
        if self._writes is None:
            self._writes = WatchedWrites(self.context, self.handle.state, self._failure, limits.idle_timeout_s)
        await self._writes.write(response)
        if ready_at is not None:
            self._calls.metrics.chunk_written.observe(time.monotonic() - ready_at)

    def _failure(self) -> StreamFailure | None:
        state = self.handle.state
        if state.status is not StreamStatus.FAILED:
            return None
        taken = self.writer.taken_failure()  # the failure may already sit in an event taken ahead
        if taken is not None:
            return taken
        for event in reversed(state.events):
            if isinstance(event, StreamFailure):
                return event
        return StreamFailure(self.handle.stream_id, ErrorKind.INTERNAL, "the stream failed")

    def mark_final(self) -> None:
        """At the stream's final: why the server ended a stream the client did not end (the
        maximum duration, say) goes out as the trailing metadata END_REASON_KEY, whatever the
        API; a stream the client ended has no reason and no such trailer."""
        reason = self.handle.state.end_reason
        if reason:
            self.context.set_trailing_metadata(((END_REASON_KEY, reason),))

    def release(self) -> None:
        """At the end of the handler: drop the writer and the write watch. Each refers back to
        this call (the writer for its stream, the watch through `_failure`), so without this
        a finished call, its stream's state and its queued audio would wait for the garbage
        collector instead of being freed when the handler returns."""
        self.writer = None
        self._writes = None

    def close(self, code: str) -> bool:
        """Free the stream's place in the scheduler: its slot goes at once, or when its running
        step returns. True once closed (at most once)."""
        if self._writes is not None:
            self._writes.close()
        handle = self.handle
        if handle is None or self.closed:
            return handle is not None
        self.closed = True
        handle.close()
        names = self._calls.api.names
        names.log.info(f"{names.log_prefix}stream closed", extra={
            "stream_id": handle.stream_id, "code": code, **(self.writer.log_counts() if self.writer else {}),
            "audio_s": round(handle.state.received / self._calls.served.geometry.sample_rate, 3),
            "wall_s": round(time.monotonic() - self.started, 3)})
        return True


class CallSkeleton:
    """StreamingRecognize and Recognize of one API on the scheduler."""

    def __init__(self, api: Api, scheduler: Scheduler, served: ServedModel, limits: TransportLimits,
                 metrics: ServerMetrics, budget: RecognizeBudget | None = None):
        self.api = api
        self.scheduler = scheduler
        self.served = served
        self.limits = limits
        self.metrics = metrics
        self.budget = budget or RecognizeBudget(limits.recognize)  # shared by both APIs' servicers

    # -- StreamingRecognize --------------------------------------------------------------------
    # A coroutine writing with context.write (not an async generator): while a write waits on a
    # client that does not read, the handler still sees its stream fail and ends the call.
    async def streaming(self, request_iterator, context) -> None:
        names = self.api.names
        method, code, reader = names.method_prefix + "StreamingRecognize", "OK", None
        call = StreamCall(self, context)
        requests = request_iterator.__aiter__()
        try:
            # Read the first request before any refusal (see the module's docstring).
            first = await self._next_request(requests, names.config)
            if first is None and await client_gone(context):
                raise asyncio.CancelledError()
            self.scheduler.check_admission()
            options = self.api.stream_options(first)
            handle = call.handle = self.scheduler.open_stream(label=options.label, endpointing=options.endpointing)
            call.writer = self.api.stream_writer(call, options, first)
            self._log_open(handle, options, context, "StreamingRecognize")
            decoder = self.api.decoder(options)
            reader = asyncio.get_running_loop().create_task(self._pump_audio(requests, call, decoder))
            await call.writer.run()
            call.close(code)
            await settle_reader(reader, handle)  # ended at its maximum duration: the client may still send
        except UnreadClient as exc:  # the client stopped reading: free its place now, end the call
            code = exc.kind.value
            call.close(code)
            self.metrics.rpc_finished(method, code)
            await abort_unread(context, exc, self.limits.idle_timeout_s)
            names.log.warning(f"{names.log_prefix}client not reading; call left to the transport",
                              extra={"code": code})
        except (StreamError, AudioError) as exc:
            kind = exc.kind if isinstance(exc, StreamError) else ErrorKind.INVALID_ARGUMENT
            code = kind.value
            if kind is not ErrorKind.CANCELLED:
                call.close(code)
                if reader is not None:
                    await settle_reader(reader, call.handle)
                elif not isinstance(exc, _ReadFailed):
                    await drain_requests(requests, quiet_s=REFUSAL_QUIET_SECONDS)  # refused before the reader started
            self._refuse(context, method, kind, str(exc))
        except asyncio.CancelledError:
            code = "CANCELLED"  # client cancelled, disconnected, or its deadline passed
            raise
        finally:
            if reader is not None:
                reader.cancel()
            if call.writer is not None:
                call.writer.cancel()
            call.close(code)
            if code in ("OK", "CANCELLED"):  # errors were counted before the status went out
                self.metrics.rpc_finished(method, code)
            call.release()

    async def _pump_audio(self, requests, call: StreamCall, decoder: Decoder) -> None:
        """Reads audio while the handler writes responses; any problem fails the stream, which
        the handler turns into the status. Once the stream no longer takes audio (it failed, or
        ended at its maximum duration), what the client still sends is read and dropped, within
        a bound, so that its status reaches it (settle_reader)."""
        handle, names = call.handle, self.api.names
        try:
            if not await self._read_audio(requests, call, decoder):
                return  # the request stream ended or broke: nothing more to read
        except _ReadFailed as exc:
            handle.fail(exc.kind, exc.message)
            return
        except AudioError as exc:
            handle.fail(ErrorKind.INVALID_ARGUMENT, str(exc))
        except StreamError as exc:
            handle.fail(exc.kind, exc.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the client, not lost
            if handle.state.status.terminal:
                # The call is ending (its status is going out, or the client left): the read was
                # cut short by the transport (grpc's AbortError). One line, no traceback.
                names.log.debug(f"{names.log_prefix}audio reader stopped: the call ended", extra={
                    "stream_id": handle.stream_id, "error": f"{type(exc).__name__}: {exc}"})
                return
            names.log.exception(f"{names.log_prefix}audio reader failed", extra={"stream_id": handle.stream_id})
            handle.fail(ErrorKind.INTERNAL, f"internal error reading audio: {exc}")
        await drain_requests(requests, quiet_s=REFUSAL_QUIET_SECONDS)

    async def _read_audio(self, requests, call: StreamCall, decoder: Decoder) -> bool:
        """True when the stream stopped taking audio before the client's requests ended."""
        handle, writer, names = call.handle, call.writer, self.api.names
        idle, most = self.limits.idle_timeout_s, self.limits.max_audio_message_bytes
        loop = asyncio.get_running_loop()
        # The idle deadline moves with audio only: requests that carry none (keep-alives) do not
        # hold a stream open past --idle-timeout-s.
        deadline = loop.time() + idle
        reads = IdleReads()  # one timer for all of this task's reads (server.transport.idle_read)
        try:
            while True:
                request = await self._next_request(requests, names.audio, max(0.0, deadline - loop.time()), reads)
                if request is None:
                    break
                data = writer.audio_of(request)
                if data and len(data) > most:
                    raise StreamError(ErrorKind.INVALID_ARGUMENT, f"audio message of {len(data)} bytes exceeds the "
                                      f"limit of {most} bytes; send smaller messages")
                if data:
                    deadline = loop.time() + idle
                elif loop.time() >= deadline:
                    # The request stream is intact (a keep-alive just arrived): the reader drains
                    # what the client still sends before the status goes out.
                    raise StreamError(ErrorKind.DEADLINE_EXCEEDED, f"idle timeout: no audio for {idle:g} s "
                                      f"({names.no_audio} without audio do not keep a stream open)")
                if data is None:
                    continue
                before = decoder.input_seconds
                samples = decoder.feed(data)
                writer.message(samples.size)  # before the push: a response may be due at once
                if not await handle.push_audio(samples):
                    return True
                self.metrics.audio_seconds.inc(decoder.input_seconds - before)
        finally:
            reads.close()
        try:
            tail = decoder.finish()
        except AudioError:
            if await client_gone(call.context):
                handle.fail(ErrorKind.CANCELLED, "the client cancelled the call")
                return False
            raise
        if await handle.push_audio(tail):
            handle.end_audio()
        return False

    async def _next_request(self, requests, what: str, timeout_s: float | None = None,
                            reads: IdleReads | None = None):
        """The next request within timeout_s (the idle timeout by default); None at the end.
        A loop of reads passes its IdleReads (one timer for all of them)."""
        idle = self.limits.idle_timeout_s
        timeout_s = idle if timeout_s is None else timeout_s
        try:
            if reads is not None:
                return await reads.next(requests, timeout_s)
            return await next_within(requests, timeout_s)
        except StopAsyncIteration:
            return None
        except DecodeError as exc:  # bytes that are no request message at all
            raise _ReadFailed(ErrorKind.INVALID_ARGUMENT,
                              f"a request is not a valid {self.api.names.request_type}: {exc}") from None
        except TimeoutError:
            raise _ReadFailed(ErrorKind.DEADLINE_EXCEEDED,
                              f"idle timeout: no request for {idle:g} s while waiting for {what}") from None

    # -- Recognize -------------------------------------------------------------------------------
    async def recognize(self, request, context):
        names = self.api.names
        method, code, handle, feeder = names.method_prefix + "Recognize", "OK", None, None
        client, size = None, len(request.audio)
        try:
            self.scheduler.check_admission()
            options = self.api.recognize_options(request)
            self.budget.acquire(candidate := client_of(context), size)
            client = candidate
            handle = self.scheduler.open_stream(label=options.label, finalize_at_limit=False,
                                                endpointing=options.endpointing)
            self._log_open(handle, options, context, "Recognize")
            decoder = self.api.decoder(options)
            feeder = asyncio.get_running_loop().create_task(self._feed_whole(handle, decoder, request.audio))
            last: ChunkResult | None = None
            finals: list[Utterance] = []
            async for event in handle:
                if isinstance(event, StreamFailure):
                    raise StreamError(event.kind, event.message)
                finals.extend(event.finals)
                last = event
            if last is None or not last.is_final:  # cannot happen: a stream ends with a final or a failure
                raise StreamError(ErrorKind.INTERNAL, "the stream ended without a final result")
            response = self.api.recognize_response(request, options, finals, last, handle.stream_id)
            check_response_size(response.ByteSize(), self.limits.max_send_bytes, "Recognize response")
            return response
        except (StreamError, AudioError) as exc:
            kind = exc.kind if isinstance(exc, StreamError) else ErrorKind.INVALID_ARGUMENT
            code = kind.value
            self._refuse(context, method, kind, str(exc))
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            if client is not None:
                self.budget.release(client, size)
            if feeder is not None:
                feeder.cancel()
            if handle is not None:
                handle.close()
                names.log.info(f"{names.log_prefix}recognize done", extra={"stream_id": handle.stream_id, "code": code})
            if code in ("OK", "CANCELLED"):
                self.metrics.rpc_finished(method, code)

    async def _feed_whole(self, handle: StreamHandle, decoder: Decoder, audio: bytes) -> None:
        """The whole file, decoded and handed over a piece at a time (push_audio waits while the
        stream has --max-pending-s of audio pending): a file costs its bytes, not its samples."""
        try:
            for at in range(0, len(audio), RECOGNIZE_PIECE_BYTES):
                before = decoder.input_seconds
                if not await handle.push_audio(decoder.feed(audio[at:at + RECOGNIZE_PIECE_BYTES])):
                    return
                self.metrics.audio_seconds.inc(decoder.input_seconds - before)
            if await handle.push_audio(decoder.finish()):
                handle.end_audio()
        except AudioError as exc:
            handle.fail(ErrorKind.INVALID_ARGUMENT, str(exc))
        except StreamError as exc:
            handle.fail(exc.kind, exc.message)

    # -- shared ----------------------------------------------------------------------------------
    def _refuse(self, context, method: str, kind: ErrorKind, message: str) -> None:
        """Ends the call with the status once the handler returns (the caller returns next; not
        context.abort, which leaves the call in a reference cycle: security.end_with_status)."""
        if kind is ErrorKind.CANCELLED:  # the client has left: no one to send a status to (counted
            raise asyncio.CancelledError()  # as CANCELLED by the handler, like any cancellation)
        # Count first: once the status is out, a client may already be reading the metrics.
        self.metrics.rpc_finished(method, kind.value)
        end_with_status(context, grpc.StatusCode[kind.value], status_message(message))

    def _log_open(self, handle: StreamHandle, options, context, rpc: str) -> None:
        names = self.api.names
        names.log.info(f"{names.log_prefix}stream opened", extra={
            "stream_id": handle.stream_id, "label": options.label, "peer": context.peer(),
            **self.api.log_fields(options, rpc)})

"""The gRPC servicer: transport only. It validates requests, decodes audio, and relays the
scheduler's events as responses; every decision about batching lives in server.scheduler."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError

from proto import asr_stream_pb2 as pb
from proto import asr_stream_pb2_grpc as pb_grpc
from server.audio_decoder import AudioDecoder
from server.call_limits import (RECOGNIZE_PIECE_BYTES, RecognizeBudget, RecognizeLimits, check_response_size,
                                client_of, status_message)
from server.idle_read import next_within
from server.metrics import ServerMetrics
from server.responses import final_result, streaming_response, whole_file_result
from server.scheduler import Scheduler, StreamHandle
from server.security import REFUSAL_DRAIN_SECONDS, REFUSAL_QUIET_SECONDS, drain_requests
from server.stream_config import ServedModel, StreamOptions, invalid, validate_config
from server.stream_events import ChunkResult, ErrorKind, StreamError, StreamFailure
from server.stream_state import StreamStatus
from server.unread_client import UnreadClient, abort_unread, write_watching
from server.wav_header import AudioError

log = logging.getLogger("nemostream.rpc")


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


class _Abort(Exception):
    """Ends an RPC with a status; raised inside handlers, turned into context.abort once."""

    def __init__(self, kind: ErrorKind, message: str, read_failed: bool = False):
        super().__init__(message)
        self.kind, self.message = kind, message
        self.read_failed = read_failed  # the request stream itself broke (undecodable, idle): read no more


async def settle_reader(reader: asyncio.Task | None, handle) -> None:
    """Before a status goes out, let the audio reader finish reading what the client still sends
    (it drains a bounded amount once the stream has failed or ended: server.security's
    drain_requests). A grpc.aio client whose request writes race the status sees INTERNAL
    "Internal error from Core" instead of it (grpc/grpc#36066); a client that has half-closed
    sees the status the server sent."""
    if reader is None or reader.done():
        return
    if handle is not None:
        handle.state.audio_room.set()  # a reader waiting for room re-checks the stream's status
    await asyncio.wait((reader,), timeout=REFUSAL_DRAIN_SECONDS + 0.5)


# Trailing metadata of a stream the server ended itself, with a final result (max duration).
END_REASON_KEY = "asr-end-reason"

async def _client_gone(context) -> bool:
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


def _code(kind: ErrorKind) -> grpc.StatusCode:
    return grpc.StatusCode[kind.value]


class SpeechRecognitionServicer(pb_grpc.SpeechRecognitionServicer):
    def __init__(self, scheduler: Scheduler, served: ServedModel, limits: TransportLimits, metrics: ServerMetrics,
                 budget: RecognizeBudget | None = None):
        self._scheduler = scheduler
        self._budget = budget or RecognizeBudget(limits.recognize)  # shared with the Riva servicer
        self._served = served
        self._limits = limits
        self._metrics = metrics
        self._frame_seconds = served.geometry.encoder_frame_seconds

    # -- StreamingRecognize --------------------------------------------------------------------
    # A coroutine writing with context.write (not an async generator): while a write waits on a
    # client that does not read, the handler still sees its stream fail and ends the call.
    async def StreamingRecognize(self, request_iterator, context) -> None:
        code, handle, reader, started = "OK", None, None, time.monotonic()
        chunks, closed = 0, False
        requests = request_iterator.__aiter__()
        try:
            # Read the first request before any refusal: a server that ends the call before
            # reading makes grpc.aio clients still writing it see INTERNAL, not our status.
            first = await self._next_request(requests, "the config")
            if first is None and await _client_gone(context):
                raise asyncio.CancelledError()
            self._scheduler.check_admission()
            if first is None:
                raise _Abort(ErrorKind.INVALID_ARGUMENT, "the stream ended before a config was sent")
            if first.WhichOneof("request") != "config":
                raise _Abort(ErrorKind.INVALID_ARGUMENT,
                             "the first request must carry the config; got audio (or an empty request) first")
            options = validate_config(first.config, self._served)
            handle = self._scheduler.open_stream(label=options.label, endpointing=options.endpointing)
            self._log_open(handle, options, context)
            decoder = AudioDecoder(options.audio, self._served.geometry.sample_rate, self._limits.max_header_bytes)
            reader = asyncio.get_running_loop().create_task(self._pump_audio(requests, handle, decoder, context))
            while (event := await handle.next_event()) is not None:
                if isinstance(event, StreamFailure):
                    raise _Abort(event.kind, event.message)
                chunks += 1
                response = streaming_response(event, options.interim_results, self._frame_seconds)
                if event.is_final and handle.state.end_reason:
                    context.set_trailing_metadata(((END_REASON_KEY, handle.state.end_reason),))
                # The stream stays open (for admission and drain) until its final is written; a
                # write that waits on a client that does not read ends in UnreadClient.
                await self._send(context, response, handle, "final result" if event.is_final else "result")
            closed = self._close(handle, code, chunks, started)
            await settle_reader(reader, handle)  # a stream ended at its maximum duration: the client may still send
        except UnreadClient as exc:
            code = exc.kind.value
            closed = self._close(handle, code, chunks, started)  # free its place now, not when gRPC lets go
            await self._abort_unread(context, exc)
        except (StreamError, _Abort) as exc:
            code = exc.kind.value
            if exc.kind is not ErrorKind.CANCELLED:
                closed = closed or self._close(handle, code, chunks, started)
                if reader is not None:
                    await settle_reader(reader, handle)
                elif not getattr(exc, "read_failed", False):
                    await drain_requests(requests, quiet_s=REFUSAL_QUIET_SECONDS)  # refused before the reader started
            await self._abort(context, "StreamingRecognize", exc.kind, exc.message)
        except asyncio.CancelledError:
            code = "CANCELLED"  # client cancelled, disconnected, or its deadline passed
            raise
        finally:
            if reader is not None:
                reader.cancel()
            if not closed:
                self._close(handle, code, chunks, started)
            if code in ("OK", "CANCELLED"):  # errors were counted before the status went out
                self._metrics.rpc_finished("StreamingRecognize", code)

    def _close(self, handle: StreamHandle | None, code: str, chunks: int, started: float) -> bool:
        """Free the stream's place in the scheduler: its slot goes at once, or when its running
        step returns. True once closed."""
        if handle is None:
            return False
        handle.close()
        log.info("stream closed", extra={"stream_id": handle.stream_id, "code": code, "chunks": chunks,
                                         "audio_s": round(handle.state.received / self._served.geometry.sample_rate, 3),
                                         "wall_s": round(time.monotonic() - started, 3)})
        return True

    async def _send(self, context, response, handle: StreamHandle, what: str = "result") -> None:
        """Write one response, watching the stream (server.unread_client)."""
        check_response_size(response.ByteSize(), self._limits.max_send_bytes, what)
        state = handle.state

        def failure() -> StreamFailure | None:
            if state.status is not StreamStatus.FAILED:
                return None
            return next((e for e in reversed(state.events) if isinstance(e, StreamFailure)), None)

        await write_watching(context, response, state, failure, self._limits.idle_timeout_s)

    async def _abort_unread(self, context, exc: UnreadClient) -> None:
        self._metrics.rpc_finished("StreamingRecognize", exc.kind.value)
        await abort_unread(context, exc, self._limits.idle_timeout_s)
        log.warning("client not reading; call left to the transport", extra={"code": exc.kind.value})

    async def _abort(self, context, method: str, kind: ErrorKind, message: str) -> None:
        if kind is ErrorKind.CANCELLED:  # the client has left: no one to send a status to (counted
            raise asyncio.CancelledError()  # as CANCELLED by the handler, like any cancellation)
        # Count first: once the status is out, a client may already be reading the metrics.
        self._metrics.rpc_finished(method, kind.value)
        await context.abort(_code(kind), status_message(message))

    async def _next_request(self, requests, what: str, timeout_s: float | None = None):
        """The next request within timeout_s (the idle timeout by default); None at the end."""
        try:
            return await next_within(requests, self._limits.idle_timeout_s if timeout_s is None else timeout_s)
        except StopAsyncIteration:
            return None
        except DecodeError as exc:  # bytes that are no request message at all
            raise _Abort(ErrorKind.INVALID_ARGUMENT,
                         f"a request is not a valid {pb.StreamingRecognizeRequest.DESCRIPTOR.full_name}: {exc}",
                         read_failed=True) from None
        except TimeoutError:
            raise _Abort(ErrorKind.DEADLINE_EXCEEDED,
                         f"idle timeout: no request for {self._limits.idle_timeout_s:g} s while waiting for {what}",
                         read_failed=True) from None

    async def _pump_audio(self, requests, handle: StreamHandle, decoder: AudioDecoder, context) -> None:
        """Reads audio while the handler writes results; any problem fails the stream, which
        the handler turns into the status. Once the stream no longer takes audio (it failed, or
        ended at its maximum duration), what the client still sends is read and dropped, within
        a bound, so that its status reaches it (settle_reader)."""
        try:
            if not await self._read_audio(requests, handle, decoder, context):
                return  # the request stream ended or broke: nothing more to read
        except AudioError as exc:
            handle.fail(ErrorKind.INVALID_ARGUMENT, str(exc))
        except StreamError as exc:
            handle.fail(exc.kind, exc.message)
        except _Abort as exc:
            handle.fail(exc.kind, exc.message)
            if exc.read_failed:
                return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the client, not lost
            if handle.state.status.terminal:
                # The call is ending (its status is going out, or the client left): the read was
                # cut short by the transport (grpc's AbortError). One line, no traceback.
                log.debug("audio reader stopped: the call ended", extra={
                    "stream_id": handle.stream_id, "error": f"{type(exc).__name__}: {exc}"})
                return
            log.exception("audio reader failed", extra={"stream_id": handle.stream_id})
            handle.fail(ErrorKind.INTERNAL, f"internal error reading audio: {exc}")
        await drain_requests(requests, quiet_s=REFUSAL_QUIET_SECONDS)

    async def _read_audio(self, requests, handle: StreamHandle, decoder: AudioDecoder, context) -> bool:
        """True when the stream stopped taking audio before the client's requests ended."""
        idle = self._limits.idle_timeout_s
        loop = asyncio.get_running_loop()
        # The idle deadline moves with audio only: requests that carry none (keep-alives) do not
        # hold a stream open past --idle-timeout-s.
        deadline = loop.time() + idle
        while True:
            request = await self._next_request(requests, "audio", max(0.0, deadline - loop.time()))
            if request is None:
                break
            kind = request.WhichOneof("request")
            if kind == "config":
                raise invalid("config sent twice: only the first request may carry a config")
            if kind == "end_utterance" and request.end_utterance:
                handle.end_utterance()  # (like a keep-alive, it does not move the idle deadline)
            if kind != "audio" or not request.audio:
                if loop.time() >= deadline:
                    # The request stream is intact (a keep-alive just arrived): the reader drains
                    # what the client still sends before the status goes out.
                    raise _Abort(ErrorKind.DEADLINE_EXCEEDED, f"idle timeout: no audio for {idle:g} s "
                                 "(requests without audio do not keep a stream open)")
                continue  # an empty request carries nothing
            deadline = loop.time() + idle
            size = len(request.audio)
            if size > self._limits.max_audio_message_bytes:
                raise invalid(f"audio message of {size} bytes exceeds the limit of "
                              f"{self._limits.max_audio_message_bytes} bytes; send smaller messages")
            before = decoder.input_seconds
            if not await handle.push_audio(decoder.feed(request.audio)):
                return True
            self._metrics.audio_seconds.inc(decoder.input_seconds - before)
        try:
            tail = decoder.finish()
        except AudioError:
            if await _client_gone(context):
                handle.fail(ErrorKind.CANCELLED, "the client cancelled the call")
                return False
            raise
        if await handle.push_audio(tail):
            handle.end_audio()
        return False

    def _log_open(self, handle: StreamHandle, options: StreamOptions, context) -> None:
        spec = options.audio
        log.info("stream opened", extra={
            "stream_id": handle.stream_id, "label": options.label, "peer": context.peer(),
            "sample_rate": spec.sample_rate, "encoding": spec.encoding.value if spec.encoding else "auto",
            "interim": options.interim_results})

    # -- Recognize -------------------------------------------------------------------------------
    async def Recognize(self, request: pb.RecognizeRequest, context):
        code, handle, feeder, client, size = "OK", None, None, None, len(request.audio)
        try:
            self._scheduler.check_admission()
            options = validate_config(request.config, self._served)
            self._budget.acquire(candidate := client_of(context), size)
            client = candidate
            handle = self._scheduler.open_stream(label=options.label, finalize_at_limit=False,
                                                 endpointing=options.endpointing)
            self._log_open(handle, options, context)
            decoder = AudioDecoder(options.audio, self._served.geometry.sample_rate, self._limits.max_header_bytes)
            feeder = asyncio.get_running_loop().create_task(self._feed_whole(handle, decoder, request.audio))
            last: ChunkResult | None = None
            finals = []
            async for event in handle:
                if isinstance(event, StreamFailure):
                    raise _Abort(event.kind, event.message)
                finals.extend(event.finals)
                last = event
            assert last is not None and last.is_final
            response = pb.RecognizeResponse(result=whole_file_result(finals, self._frame_seconds),
                                            audio_processed=last.audio_seconds, stream_id=handle.stream_id)
            if options.endpointing is not None:
                response.utterances.extend(final_result(u, self._frame_seconds) for u in finals)
            check_response_size(response.ByteSize(), self._limits.max_send_bytes, "Recognize response")
            return response
        except (StreamError, _Abort) as exc:
            code = exc.kind.value
            await self._abort(context, "Recognize", exc.kind, exc.message)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            if client is not None:
                self._budget.release(client, size)
            if feeder is not None:
                feeder.cancel()
            if handle is not None:
                handle.close()
                log.info("recognize done", extra={"stream_id": handle.stream_id, "code": code})
            if code in ("OK", "CANCELLED"):
                self._metrics.rpc_finished("Recognize", code)

    async def _feed_whole(self, handle: StreamHandle, decoder: AudioDecoder, audio: bytes) -> None:
        """The whole file, decoded and handed over a piece at a time (push_audio waits while the
        stream has --max-pending-s of audio pending): a file costs its bytes, not its samples."""
        try:
            for at in range(0, len(audio), RECOGNIZE_PIECE_BYTES):
                before = decoder.input_seconds
                if not await handle.push_audio(decoder.feed(audio[at:at + RECOGNIZE_PIECE_BYTES])):
                    return
                self._metrics.audio_seconds.inc(decoder.input_seconds - before)
            if await handle.push_audio(decoder.finish()):
                handle.end_audio()
        except AudioError as exc:
            handle.fail(ErrorKind.INVALID_ARGUMENT, str(exc))
        except StreamError as exc:
            handle.fail(exc.kind, exc.message)

    # -- ListModels ------------------------------------------------------------------------------
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        info, g, s = self._served.info, self._served.geometry, self._scheduler
        model = pb.ModelInfo(
            name=info.name, lookahead_ms=info.lookahead_ms, lookaheads_ms=list(info.lookaheads_ms),
            sample_rate=info.sample_rate, chunk_ms=g.chunk_ms, vocabulary_size=info.vocabulary_size,
            random_weights=info.random_weights, description=info.description, languages=list(info.languages),
            engine=s.engine_name or "", engine_executions=s.executions, max_streams=s.capacity,
            max_batch=s.max_batch, eou_token=info.eou_token,
        )
        e = self._served.endpointing
        model.endpointing_defaults.CopyFrom(pb.EndpointingConfig(
            start_history_ms=e.start_history_ms, start_threshold=e.start_threshold, stop_history_ms=e.stop_history_ms,
            stop_threshold=e.stop_threshold, stop_history_eou_ms=e.stop_history_eou_ms,
            stop_threshold_eou=e.stop_threshold_eou))
        self._metrics.rpc_finished("ListModels", "OK")
        return pb.ListModelsResponse(models=[model])

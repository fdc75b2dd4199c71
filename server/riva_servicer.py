"""NVIDIA Riva's ASR service (nvidia.riva.asr.RivaSpeechRecognition) on this server's scheduler:
unmodified `nvidia-riva-client` scripts work against it by changing the address.

Transport only, like server.servicer: it validates (server.riva_convert), decodes audio and
relays the scheduler's events, on the same scheduler, limits and metrics as the native API.

StreamingRecognize answers every audio message exactly once, in order (Riva's clients time
message i's send to response i's arrival). Response i goes out once the engine has decoded all
the audio message i brought, with the transcript so far as an interim result when
interim_results is set, else with no results; a message that adds no audio (a WAV header, an
empty message) is answered at once. The last message's response carries the final result; a
stream whose every message was already answered (or that sent no audio) gets the final in one
extra response. Audio past a message's end is needed before its response can go out (the
model's lookahead and the chunk size), so a client must keep sending without waiting for
responses, as Riva's clients do. The riva_convert module docstring lists which Riva options
are honoured and which are refused.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from google.protobuf.message import DecodeError

from proto.riva import riva_asr_pb2 as rpb
from proto.riva import riva_asr_pb2_grpc as rpb_grpc
from server.call_limits import (RECOGNIZE_PIECE_BYTES, RecognizeBudget, check_request_id, check_response_size,
                                client_of, status_message)
from server.idle_read import next_within
from server.metrics import ServerMetrics
from server.riva_convert import (
    ResponsePacer, RivaAudio, RivaOptions, RivaSettings, check_runtime_config, invalid, model_configs,
    recognize_response, request_label, streaming_response, validate_riva_config,
)
from server.scheduler import Scheduler, StreamHandle
from server.security import REFUSAL_QUIET_SECONDS, drain_requests
from server.servicer import TransportLimits, settle_reader
from server.stream_config import ServedModel
from server.stream_events import ChunkResult, ErrorKind, StreamError, StreamFailure
from server.stream_state import StreamStatus
from server.unread_client import UnreadClient, abort_unread, write_watching
from server.wav_header import AudioError

log = logging.getLogger("nemostream.riva")

RIVA_SERVICE_NAME = rpb.DESCRIPTOR.services_by_name["RivaSpeechRecognition"].full_name
_METHOD = "Riva/"  # metrics label prefix: Riva/StreamingRecognize, Riva/Recognize, ...


class RivaSpeechRecognitionServicer(rpb_grpc.RivaSpeechRecognitionServicer):
    def __init__(self, scheduler: Scheduler, served: ServedModel, limits: TransportLimits, metrics: ServerMetrics,
                 settings: RivaSettings | None = None, budget: RecognizeBudget | None = None):
        self._scheduler = scheduler
        self._budget = budget or RecognizeBudget(limits.recognize)  # shared with the native servicer
        self._served = served
        self._limits = limits
        self._metrics = metrics
        self._settings = settings or RivaSettings()
        self._rate = served.geometry.sample_rate
        self._frame_seconds = served.geometry.encoder_frame_seconds

    # -- StreamingRecognize --------------------------------------------------------------------
    # A coroutine writing with context.write (not an async generator): while a write waits on a
    # client that does not read, the call still sees its stream fail and ends.
    async def StreamingRecognize(self, request_iterator, context) -> None:
        method, code, handle, reader, call = _METHOD + "StreamingRecognize", "OK", None, None, None
        started, closed, read_failed = time.monotonic(), False, False
        requests = request_iterator.__aiter__()
        try:
            # Read the first request before any refusal: a server that ends the call before
            # reading makes grpc.aio clients still writing it see INTERNAL, not our status.
            try:
                first = await self._next_request(requests, "the streaming_config")
            except StreamError:
                read_failed = True
                raise
            self._scheduler.check_admission()
            if first is None:
                raise invalid("the stream ended before a streaming_config was sent")
            if first.WhichOneof("streaming_request") != "streaming_config":
                raise invalid("the first request must carry the streaming_config; got audio_content (or nothing) first")
            check_runtime_config(first)
            check_request_id(first.id.value)
            options = validate_riva_config(first.streaming_config.config, self._served, self._settings,
                                           first.streaming_config.interim_results, request_label(first.id.value))
            handle = self._scheduler.open_stream(label=options.label, endpointing=options.endpointing)
            self._log_open(handle, options, context, "StreamingRecognize")
            call = _StreamCall(context, handle, options, first.id.value, self._rate, self._frame_seconds,
                               self._limits.idle_timeout_s)
            call.max_send_bytes = self._limits.max_send_bytes
            # At the final the scheduler is done with the stream: its place is free even while
            # the last responses wait on a slow reader.
            call.on_final = lambda: self._close(handle, call, "OK", started)
            audio = RivaAudio(options, self._rate, self._limits.max_header_bytes)
            reader = asyncio.get_running_loop().create_task(self._pump_audio(requests, handle, audio, call))
            await call.run()
            closed = self._close(handle, call, code, started)
            await settle_reader(reader, handle)  # ended at its maximum duration: the client may still send
        except UnreadClient as exc:  # the client stopped reading: free its place now, end the call
            code = exc.kind.value
            closed = self._close(handle, call, code, started)
            await self._abort_unread(context, method, exc)
        except (StreamError, AudioError) as exc:
            kind = exc.kind if isinstance(exc, StreamError) else ErrorKind.INVALID_ARGUMENT
            code = kind.value
            if kind is not ErrorKind.CANCELLED:
                closed = closed or self._close(handle, call, code, started)
                if reader is not None:
                    await settle_reader(reader, handle)
                elif not read_failed:
                    await drain_requests(requests, quiet_s=REFUSAL_QUIET_SECONDS)  # refused before the reader started
            await self._abort(context, method, kind, str(exc))
        except asyncio.CancelledError:
            code = "CANCELLED"  # client cancelled, disconnected, or its deadline passed
            raise
        finally:
            if reader is not None:
                reader.cancel()
            if call is not None:
                call.cancel()
            if not closed:
                self._close(handle, call, code, started)
            if code in ("OK", "CANCELLED"):  # errors were counted before the status went out
                self._metrics.rpc_finished(method, code)

    def _close(self, handle: StreamHandle | None, call: _StreamCall | None, code: str, started: float) -> bool:
        """Free the stream's place in the scheduler: its slot goes at once, or when its running
        step returns. True once closed."""
        if handle is None or (call is not None and call.closed):
            return handle is not None
        if call is not None:
            call.closed = True
        handle.close()
        log.info("riva stream closed", extra={
            "stream_id": handle.stream_id, "code": code,
            "messages": call.pacer.messages if call else 0, "responses": call.pacer.answered if call else 0,
            "audio_s": round(handle.state.received / self._rate, 3), "wall_s": round(time.monotonic() - started, 3)})
        return True

    async def _abort_unread(self, context, method: str, exc: UnreadClient) -> None:
        self._metrics.rpc_finished(method, exc.kind.value)
        await abort_unread(context, exc, self._limits.idle_timeout_s)
        log.warning("riva client not reading; call left to the transport", extra={"code": exc.kind.value})

    async def _pump_audio(self, requests, handle: StreamHandle, audio: RivaAudio, call: _StreamCall) -> None:
        """Reads audio messages while the handler writes responses; a problem fails the stream,
        which the handler turns into the status. Once the stream takes no more audio, what the
        client still sends is read and dropped, within a bound (server.servicer.settle_reader)."""
        try:
            if not await self._read_audio(requests, handle, audio, call):
                return
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
                log.debug("riva audio reader stopped: the call ended", extra={
                    "stream_id": handle.stream_id, "error": f"{type(exc).__name__}: {exc}"})
                return
            log.exception("riva audio reader failed", extra={"stream_id": handle.stream_id})
            handle.fail(ErrorKind.INTERNAL, f"internal error reading audio: {exc}")
        await drain_requests(requests, quiet_s=REFUSAL_QUIET_SECONDS)

    async def _read_audio(self, requests, handle: StreamHandle, audio: RivaAudio, call: _StreamCall) -> bool:
        """True when the stream stopped taking audio before the client's requests ended."""
        idle = self._limits.idle_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + idle  # moves with audio only: empty messages do not keep a stream open
        while True:
            try:
                request = await self._next_request(requests, "audio_content", max(0.0, deadline - loop.time()))
            except StreamError as exc:
                raise _ReadFailed(exc.kind, exc.message) from None
            if request is None:
                break
            kind = request.WhichOneof("streaming_request")
            if kind == "streaming_config":
                raise invalid("streaming_config sent twice: only the first request may carry it")
            check_runtime_config(request)
            data = request.audio_content  # a request without audio still gets its response
            if len(data) > self._limits.max_audio_message_bytes:
                raise invalid(f"audio message of {len(data)} bytes exceeds the limit of "
                              f"{self._limits.max_audio_message_bytes} bytes; send smaller messages")
            if data:
                deadline = loop.time() + idle
            elif loop.time() >= deadline:
                raise StreamError(ErrorKind.DEADLINE_EXCEEDED, f"idle timeout: no audio for {idle:g} s "
                                  "(messages without audio do not keep a stream open)")  # intact: drained
            before = audio.input_seconds
            samples = audio.feed(data)
            call.message(samples.size)  # before the push: its response may be due at once
            if not await handle.push_audio(samples):
                return True
            self._metrics.audio_seconds.inc(audio.input_seconds - before)
        if await handle.push_audio(audio.finish()):
            handle.end_audio()
        return False

    # -- Recognize -------------------------------------------------------------------------------
    async def Recognize(self, request: rpb.RecognizeRequest, context):
        method, code, handle, feeder = _METHOD + "Recognize", "OK", None, None
        client, size = None, len(request.audio)
        try:
            self._scheduler.check_admission()
            check_request_id(request.id.value)
            options = validate_riva_config(request.config, self._served, self._settings,
                                           label=request_label(request.id.value))
            self._budget.acquire(candidate := client_of(context), size)
            client = candidate
            handle = self._scheduler.open_stream(label=options.label, finalize_at_limit=False,
                                                 endpointing=options.endpointing)
            self._log_open(handle, options, context, "Recognize")
            audio = RivaAudio(options, self._rate, self._limits.max_header_bytes)
            feeder = asyncio.get_running_loop().create_task(self._feed_whole(handle, audio, request.audio))
            last: ChunkResult | None = None
            finals = []
            async for event in handle:
                if isinstance(event, StreamFailure):
                    raise StreamError(event.kind, event.message)
                finals.extend(event.finals)
                last = event
            if last is None or not last.is_final:
                raise StreamError(ErrorKind.INTERNAL, "the stream ended without a final result")
            response = recognize_response(finals, last.audio_seconds, options, self._frame_seconds, request.id.value)
            check_response_size(response.ByteSize(), self._limits.max_send_bytes, "Recognize response")
            return response
        except StreamError as exc:
            code = exc.kind.value
            await self._abort(context, method, exc.kind, exc.message)
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
                log.info("riva recognize done", extra={"stream_id": handle.stream_id, "code": code})
            if code in ("OK", "CANCELLED"):
                self._metrics.rpc_finished(method, code)

    async def _feed_whole(self, handle: StreamHandle, audio: RivaAudio, data: bytes) -> None:
        """A piece at a time, as server.servicer's: a file costs its bytes, not its samples."""
        try:
            for at in range(0, len(data), RECOGNIZE_PIECE_BYTES):
                before = audio.input_seconds
                if not await handle.push_audio(audio.feed(data[at:at + RECOGNIZE_PIECE_BYTES])):
                    return
                self._metrics.audio_seconds.inc(audio.input_seconds - before)
            if await handle.push_audio(audio.finish()):
                handle.end_audio()
        except AudioError as exc:
            handle.fail(ErrorKind.INVALID_ARGUMENT, str(exc))
        except StreamError as exc:
            handle.fail(exc.kind, exc.message)

    # -- GetRivaSpeechRecognitionConfig ------------------------------------------------------
    async def GetRivaSpeechRecognitionConfig(self, request: rpb.RivaSpeechRecognitionConfigRequest, context):
        method = _METHOD + "GetRivaSpeechRecognitionConfig"
        if request.model_name and request.model_name not in self._served.names:
            self._metrics.rpc_finished(method, "NOT_FOUND")
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model_name!r} is not served here; "
                                                           f"served: {', '.join(self._served.names)}")
        s, g = self._scheduler, self._served.geometry
        parameters = {"engine": s.engine_name or "", "chunk_ms": f"{g.chunk_ms:g}",
                      "max_streams": str(s.capacity), "max_batch": str(s.max_batch),
                      "automatic_punctuation": str(self._settings.model_punctuates).lower(),
                      "inverse_text_normalization": str(self._settings.model_written_form).lower(),
                      "endpointing": "model",  # from the acoustic model's own per-frame output
                      **{f"endpointing.{k}": f"{v:g}" for k, v in vars(self._served.endpointing).items()},
                      "eou_token": self._served.info.eou_token}
        self._metrics.rpc_finished(method, "OK")
        return rpb.RivaSpeechRecognitionConfigResponse(model_config=model_configs(self._served, parameters))

    # -- shared ------------------------------------------------------------------------------
    async def _abort(self, context, method: str, kind: ErrorKind, message: str) -> None:
        # Count first: once the status is out, a client may already be reading the metrics.
        self._metrics.rpc_finished(method, kind.value)
        await context.abort(grpc.StatusCode[kind.value], status_message(message))

    async def _next_request(self, requests, what: str, timeout_s: float | None = None):
        try:
            return await next_within(requests, self._limits.idle_timeout_s if timeout_s is None else timeout_s)
        except StopAsyncIteration:
            return None
        except DecodeError as exc:  # bytes that are no request message at all
            raise StreamError(ErrorKind.INVALID_ARGUMENT, "a request is not a valid "
                              f"{rpb.StreamingRecognizeRequest.DESCRIPTOR.full_name}: {exc}") from None
        except TimeoutError:
            raise StreamError(ErrorKind.DEADLINE_EXCEEDED, f"idle timeout: no request for "
                              f"{self._limits.idle_timeout_s:g} s while waiting for {what}") from None

    def _log_open(self, handle: StreamHandle, options: RivaOptions, context, rpc: str) -> None:
        log.info("riva stream opened", extra={
            "stream_id": handle.stream_id, "rpc": rpc, "label": options.label, "peer": context.peer(),
            "sample_rate": options.sample_rate, "interim": options.interim_results,
            "word_times": options.word_times, "endpointing": options.endpointing is not None,
            "notes": list(options.notes)})


class _ReadFailed(StreamError):
    """The request stream itself broke (undecodable, idle): nothing more is read from it."""


class _StreamCall:
    """One StreamingRecognize call after its config: merges the scheduler's events with the
    arrival of audio messages (ResponsePacer) and writes one response per message. At most one
    event is taken ahead of the writes, so a slow reader is still held back by the scheduler's
    response buffer; while a write waits, a failure of the stream ends the call."""

    def __init__(self, context, handle: StreamHandle, options: RivaOptions, request_id: str, rate: int,
                 frame_seconds: float, idle_timeout_s: float):
        self.context, self.handle, self.options, self.request_id = context, handle, options, request_id
        self.rate, self.frame_seconds, self.idle_timeout_s = rate, frame_seconds, idle_timeout_s
        self.pacer = ResponsePacer()
        self.closed = False
        self.max_send_bytes = 32 << 20
        self.on_final = lambda: None
        self._wake = asyncio.Event()   # an audio message arrived
        self._latest: ChunkResult | None = None
        self._event_task: asyncio.Future | None = None
        self._wake_task: asyncio.Future | None = None

    def message(self, samples: int) -> None:
        """The audio reader got a message adding `samples` samples (called before it pushes them)."""
        self.pacer.message(samples)
        self._wake.set()

    async def run(self) -> None:
        while True:
            if self._wake_task is None:  # cleared before ready(): a message arriving meanwhile re-wakes
                self._wake.clear()
                self._wake_task = asyncio.ensure_future(self._wake.wait())
            await self._answer(self.pacer.ready())
            if self._event_task is None:
                self._event_task = asyncio.ensure_future(self.handle.next_event())
            done, _ = await asyncio.wait((self._event_task, self._wake_task), return_when=asyncio.FIRST_COMPLETED)
            if self._wake_task in done:
                self._wake_task = None
            if self._event_task not in done:
                continue
            event, self._event_task = self._event_task.result(), None
            if event is None:  # cannot happen: a stream ends with a final or a failure
                raise StreamError(ErrorKind.INTERNAL, "the stream ended without a final result")
            if isinstance(event, StreamFailure):
                raise StreamError(event.kind, event.message)
            self._latest = event
            if not event.is_final:
                # An utterance's final rides on the next response due; with none due (a message
                # reaching past the chunk that closed it), on one extra response, so that it
                # goes out now and not a message later.
                await self._answer(self.pacer.progress(round(event.audio_seconds * self.rate)), event.finals,
                                   extra=True)
                continue
            # Messages answerable before the final (no samples of their own) are answered first,
            # whether or not this loop saw their wake-up before the final arrived.
            await self._answer(self.pacer.ready())
            total = self.pacer.finish()
            self.on_final()
            await self._answer(total - 1)
            await self._write(streaming_response(event, self.options, self.frame_seconds, event.finals,
                                                 self.request_id, stream_over=True))
            return

    async def _answer(self, n: int, finals: tuple = (), extra: bool = False) -> None:
        """Write n responses, the last carrying `finals`; with `extra`, finals and no response
        due make one response more."""
        if finals and n == 0 and extra:
            n = 1
        for i in range(n):
            await self._write(streaming_response(self._latest, self.options, self.frame_seconds,
                                                 finals if i == n - 1 else (), self.request_id))

    async def _write(self, response) -> None:
        """Write one response, watching the stream (server.unread_client)."""
        check_response_size(response.ByteSize(), self.max_send_bytes)
        await write_watching(self.context, response, self.handle.state, self._failure, self.idle_timeout_s)

    def _failure(self) -> StreamFailure | None:
        state = self.handle.state
        if state.status is not StreamStatus.FAILED:
            return None
        task = self._event_task  # the failure may already sit in the event taken ahead
        if task is not None and task.done() and not task.cancelled() and isinstance(task.result(), StreamFailure):
            return task.result()
        for event in reversed(state.events):
            if isinstance(event, StreamFailure):
                return event
        return StreamFailure(self.handle.stream_id, ErrorKind.INTERNAL, "the stream failed")

    def cancel(self) -> None:
        for task in (self._event_task, self._wake_task):
            if task is not None:
                task.cancel()


def add_riva_servicer(servicer: RivaSpeechRecognitionServicer, server: grpc.aio.Server) -> None:
    rpb_grpc.add_RivaSpeechRecognitionServicer_to_server(servicer, server)

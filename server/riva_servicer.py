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

from proto.riva import riva_asr_pb2 as rpb
from proto.riva import riva_asr_pb2_grpc as rpb_grpc
from server.metrics import ServerMetrics
from server.riva_convert import (
    ResponsePacer, RivaAudio, RivaOptions, RivaSettings, check_runtime_config, invalid, model_configs,
    recognize_response, request_label, streaming_response, validate_riva_config,
)
from server.scheduler import Scheduler, StreamHandle
from server.servicer import TransportLimits
from server.stream_config import ServedModel
from server.stream_events import ChunkResult, ErrorKind, StreamError, StreamFailure
from server.wav_header import AudioError

log = logging.getLogger("nemostream.riva")

RIVA_SERVICE_NAME = rpb.DESCRIPTOR.services_by_name["RivaSpeechRecognition"].full_name
_METHOD = "Riva/"  # metrics label prefix: Riva/StreamingRecognize, Riva/Recognize, ...


class RivaSpeechRecognitionServicer(rpb_grpc.RivaSpeechRecognitionServicer):
    def __init__(self, scheduler: Scheduler, served: ServedModel, limits: TransportLimits, metrics: ServerMetrics,
                 settings: RivaSettings | None = None):
        self._scheduler = scheduler
        self._served = served
        self._limits = limits
        self._metrics = metrics
        self._settings = settings or RivaSettings()
        self._rate = served.geometry.sample_rate
        self._frame_seconds = served.geometry.encoder_frame_seconds

    # -- StreamingRecognize --------------------------------------------------------------------
    async def StreamingRecognize(self, request_iterator, context):
        method, code, handle, reader = _METHOD + "StreamingRecognize", "OK", None, None
        pacer, started, waits = ResponsePacer(), time.monotonic(), []
        try:
            requests = request_iterator.__aiter__()
            # Read the first request before any refusal: a server that ends the call before
            # reading makes grpc.aio clients still writing it see INTERNAL, not our status.
            first = await self._next_request(requests, "the streaming_config")
            self._scheduler.check_admission()
            if first is None:
                raise invalid("the stream ended before a streaming_config was sent")
            if first.WhichOneof("streaming_request") != "streaming_config":
                raise invalid("the first request must carry the streaming_config; got audio_content (or nothing) first")
            check_runtime_config(first)
            request_id = first.id.value
            options = validate_riva_config(first.streaming_config.config, self._served, self._settings,
                                           first.streaming_config.interim_results, request_label(request_id))
            handle = self._scheduler.open_stream(label=options.label)
            self._log_open(handle, options, context, "StreamingRecognize")
            audio = RivaAudio(options, self._rate, self._limits.max_header_bytes)
            wake = asyncio.Event()
            reader = asyncio.get_running_loop().create_task(self._pump_audio(requests, handle, audio, pacer, wake))
            async for response in self._responses(handle, options, pacer, wake, request_id, waits):
                yield response
        except (StreamError, AudioError) as exc:
            kind = exc.kind if isinstance(exc, StreamError) else ErrorKind.INVALID_ARGUMENT
            code = kind.value
            await self._abort(context, method, kind, str(exc))
        except asyncio.CancelledError:
            code = "CANCELLED"  # client cancelled, disconnected, or its deadline passed
            raise
        finally:
            for task in (reader, *waits):
                if task is not None:
                    task.cancel()
            if handle is not None:
                handle.close()
                log.info("riva stream closed", extra={
                    "stream_id": handle.stream_id, "code": code, "messages": pacer.messages,
                    "responses": pacer.answered, "audio_s": round(handle.state.received / self._rate, 3),
                    "wall_s": round(time.monotonic() - started, 3)})
            if code in ("OK", "CANCELLED"):  # errors were counted before the status went out
                self._metrics.rpc_finished(method, code)

    async def _responses(self, handle: StreamHandle, options: RivaOptions, pacer: ResponsePacer,
                         wake: asyncio.Event, request_id: str, waits: list):
        """Merge the scheduler's events with the arrival of audio messages into one response per
        message. Only one event is taken ahead of the client's reading, so the scheduler's
        response buffer still holds a slow reader back."""
        latest: ChunkResult | None = None
        event_task: asyncio.Task | None = None
        wake_task: asyncio.Task | None = None
        waits[:] = []
        while True:
            for _ in range(pacer.ready()):
                yield streaming_response(latest, options, self._frame_seconds, False, request_id)
            if event_task is None:
                event_task = asyncio.ensure_future(handle.next_event())
            if wake_task is None:
                wake.clear()
                wake_task = asyncio.ensure_future(wake.wait())
            waits[:] = [event_task, wake_task]
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if wake_task in done:
                wake_task = None
            if event_task not in done:
                continue
            event, event_task = event_task.result(), None
            if event is None:  # cannot happen: a stream ends with a final or a failure
                raise StreamError(ErrorKind.INTERNAL, "the stream ended without a final result")
            if isinstance(event, StreamFailure):
                raise StreamError(event.kind, event.message)
            latest = event
            if not event.is_final:
                for _ in range(pacer.progress(round(event.audio_seconds * self._rate))):
                    yield streaming_response(latest, options, self._frame_seconds, False, request_id)
                continue
            total = pacer.finish()
            for _ in range(total - 1):
                yield streaming_response(latest, options, self._frame_seconds, False, request_id)
            yield streaming_response(latest, options, self._frame_seconds, True, request_id)
            return

    async def _pump_audio(self, requests, handle: StreamHandle, audio: RivaAudio, pacer: ResponsePacer,
                          wake: asyncio.Event) -> None:
        """Reads audio messages while the handler writes responses; a problem fails the stream,
        which the handler turns into the status."""
        try:
            while True:
                request = await self._next_request(requests, "audio_content")
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
                before = audio.input_seconds
                samples = audio.feed(data)
                pacer.message(samples.size)  # before the push: its response may be due at once
                wake.set()
                if not await handle.push_audio(samples):
                    return
                self._metrics.audio_seconds.inc(audio.input_seconds - before)
            if await handle.push_audio(audio.finish()):
                handle.end_audio()
        except AudioError as exc:
            handle.fail(ErrorKind.INVALID_ARGUMENT, str(exc))
        except StreamError as exc:
            handle.fail(exc.kind, exc.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the client, not lost
            log.exception("riva audio reader failed", extra={"stream_id": handle.stream_id})
            handle.fail(ErrorKind.INTERNAL, f"internal error reading audio: {exc}")

    # -- Recognize -------------------------------------------------------------------------------
    async def Recognize(self, request: rpb.RecognizeRequest, context):
        method, code, handle, feeder = _METHOD + "Recognize", "OK", None, None
        try:
            self._scheduler.check_admission()
            options = validate_riva_config(request.config, self._served, self._settings,
                                           label=request_label(request.id.value))
            handle = self._scheduler.open_stream(label=options.label)
            self._log_open(handle, options, context, "Recognize")
            audio = RivaAudio(options, self._rate, self._limits.max_header_bytes)
            feeder = asyncio.get_running_loop().create_task(self._feed_whole(handle, audio, request.audio))
            final: ChunkResult | None = None
            async for event in handle:
                if isinstance(event, StreamFailure):
                    raise StreamError(event.kind, event.message)
                final = event
            if final is None or not final.is_final:
                raise StreamError(ErrorKind.INTERNAL, "the stream ended without a final result")
            return recognize_response(final, options, self._frame_seconds, request.id.value)
        except StreamError as exc:
            code = exc.kind.value
            await self._abort(context, method, exc.kind, exc.message)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            if feeder is not None:
                feeder.cancel()
            if handle is not None:
                handle.close()
                log.info("riva recognize done", extra={"stream_id": handle.stream_id, "code": code})
            if code in ("OK", "CANCELLED"):
                self._metrics.rpc_finished(method, code)

    async def _feed_whole(self, handle: StreamHandle, audio: RivaAudio, data: bytes) -> None:
        try:
            if await handle.push_audio(audio.feed(data)) and await handle.push_audio(audio.finish()):
                handle.end_audio()
            self._metrics.audio_seconds.inc(audio.input_seconds)
        except AudioError as exc:
            handle.fail(ErrorKind.INVALID_ARGUMENT, str(exc))

    # -- GetRivaSpeechRecognitionConfig ------------------------------------------------------
    async def GetRivaSpeechRecognitionConfig(self, request: rpb.RivaSpeechRecognitionConfigRequest, context):
        method = _METHOD + "GetRivaSpeechRecognitionConfig"
        if request.model_name and request.model_name not in self._served.names:
            self._metrics.rpc_finished(method, "NOT_FOUND")
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model_name!r} is not served here; "
                                                           f"served: {', '.join(self._served.names)}")
        s, g = self._scheduler, self._served.geometry
        parameters = {"engine": s.engine_name or "", "chunk_ms": f"{g.chunk_ms:g}",
                      "max_streams": str(s.engine.capacity), "max_batch": str(s.max_batch),
                      "automatic_punctuation": str(self._settings.model_punctuates).lower(),
                      "inverse_text_normalization": str(self._settings.model_written_form).lower()}
        self._metrics.rpc_finished(method, "OK")
        return rpb.RivaSpeechRecognitionConfigResponse(model_config=model_configs(self._served, parameters))

    # -- shared ------------------------------------------------------------------------------
    async def _abort(self, context, method: str, kind: ErrorKind, message: str) -> None:
        # Count first: once the status is out, a client may already be reading the metrics.
        self._metrics.rpc_finished(method, kind.value)
        await context.abort(grpc.StatusCode[kind.value], message)

    async def _next_request(self, requests, what: str):
        try:
            return await asyncio.wait_for(requests.__anext__(), self._limits.idle_timeout_s)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise StreamError(ErrorKind.DEADLINE_EXCEEDED, f"idle timeout: no request for "
                              f"{self._limits.idle_timeout_s:g} s while waiting for {what}") from None

    def _log_open(self, handle: StreamHandle, options: RivaOptions, context, rpc: str) -> None:
        log.info("riva stream opened", extra={
            "stream_id": handle.stream_id, "rpc": rpc, "label": options.label, "peer": context.peer(),
            "sample_rate": options.sample_rate, "interim": options.interim_results,
            "word_times": options.word_times})


def add_riva_servicer(servicer: RivaSpeechRecognitionServicer, server: grpc.aio.Server) -> None:
    rpb_grpc.add_RivaSpeechRecognitionServicer_to_server(servicer, server)

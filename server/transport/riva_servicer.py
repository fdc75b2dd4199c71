"""NVIDIA Riva's ASR service (nvidia.riva.asr.RivaSpeechRecognition) on this server's scheduler:
unmodified `nvidia-riva-client` scripts work against it by changing the address.

Transport only, like server.transport.servicer, and on the same call skeleton (server.transport.call_skeleton: first
request, admission, the audio reader, watched writes, statuses, metrics), scheduler, limits and
metrics as the native API. This module supplies Riva's half: its request checks and options
(server.transport.riva_convert), its audio decoding and its responses.

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

import grpc

from proto.riva import riva_asr_pb2 as rpb
from proto.riva import riva_asr_pb2_grpc as rpb_grpc
from server.transport.call_limits import RecognizeBudget, check_request_id
from server.transport.call_skeleton import ApiNames, CallSkeleton, StreamCall, StreamWriter, TransportLimits
from server.ops.metrics import ServerMetrics
from server.transport.riva_convert import (
    ResponsePacer, RivaAudio, RivaOptions, RivaSettings, check_runtime_config, invalid, model_configs,
    recognize_response, request_label, streaming_response, validate_riva_config,
)
from server.scheduling.scheduler import Scheduler
from server.transport.stream_config import ServedModel
from server.transport.security import end_with_status
from server.scheduling.stream_events import ChunkResult, ErrorKind, StreamError, StreamFailure, Utterance

log = logging.getLogger("nemostream.riva")

RIVA_SERVICE_NAME = rpb.DESCRIPTOR.services_by_name["RivaSpeechRecognition"].full_name
_METHOD = "Riva/"  # metrics label prefix: Riva/StreamingRecognize, Riva/Recognize, ...

NAMES = ApiNames(log=log, log_prefix="riva ", method_prefix=_METHOD,
                 request_type=rpb.StreamingRecognizeRequest.DESCRIPTOR.full_name,
                 config="the streaming_config", audio="audio_content", no_audio="messages")


class RivaSpeechRecognitionServicer(rpb_grpc.RivaSpeechRecognitionServicer):
    """The call's flow is server.transport.call_skeleton's; this class supplies Riva's half."""

    names = NAMES

    def __init__(self, scheduler: Scheduler, served: ServedModel, limits: TransportLimits, metrics: ServerMetrics,
                 settings: RivaSettings | None = None, budget: RecognizeBudget | None = None):
        self._scheduler = scheduler
        self._served = served
        self._limits = limits
        self._metrics = metrics
        self._settings = settings or RivaSettings()
        self._rate = served.geometry.sample_rate
        self._frame_seconds = served.geometry.encoder_frame_seconds
        self._calls = CallSkeleton(self, scheduler, served, limits, metrics, budget)  # budget: shared with native

    async def StreamingRecognize(self, request_iterator, context) -> None:
        await self._calls.streaming(request_iterator, context)

    async def Recognize(self, request: rpb.RecognizeRequest, context):
        return await self._calls.recognize(request, context)

    # -- Riva's half of a call (server.transport.call_skeleton.Api) ----------------------------------------
    def stream_options(self, first: rpb.StreamingRecognizeRequest | None) -> RivaOptions:
        if first is None:
            raise invalid("the stream ended before a streaming_config was sent")
        if first.WhichOneof("streaming_request") != "streaming_config":
            raise invalid("the first request must carry the streaming_config; got audio_content (or nothing) first")
        check_runtime_config(first)
        check_request_id(first.id.value)
        return validate_riva_config(first.streaming_config.config, self._served, self._settings,
                                    first.streaming_config.interim_results, request_label(first.id.value))

    def stream_writer(self, call: StreamCall, options: RivaOptions, first: rpb.StreamingRecognizeRequest):
        return _RivaWriter(call, options, first.id.value, self._rate, self._frame_seconds)

    def recognize_options(self, request: rpb.RecognizeRequest) -> RivaOptions:
        check_request_id(request.id.value)
        return validate_riva_config(request.config, self._served, self._settings,
                                    label=request_label(request.id.value))

    def recognize_response(self, request: rpb.RecognizeRequest, options: RivaOptions, finals: list[Utterance],
                           last: ChunkResult, stream_id: str) -> rpb.RecognizeResponse:
        return recognize_response(finals, last.audio_seconds, options, self._frame_seconds, request.id.value)

    def decoder(self, options: RivaOptions) -> RivaAudio:
        return RivaAudio(options, self._rate, self._limits.max_header_bytes)

    def log_fields(self, options: RivaOptions, rpc: str) -> dict:
        return {"rpc": rpc, "sample_rate": options.sample_rate, "interim": options.interim_results,
                "word_times": options.word_times, "endpointing": options.endpointing is not None,
                "notes": list(options.notes)}

    # -- GetRivaSpeechRecognitionConfig ------------------------------------------------------
    async def GetRivaSpeechRecognitionConfig(self, request: rpb.RivaSpeechRecognitionConfigRequest, context):
        method = _METHOD + "GetRivaSpeechRecognitionConfig"
        if request.model_name and request.model_name not in self._served.names:
            self._metrics.rpc_finished(method, "NOT_FOUND")
            end_with_status(context, grpc.StatusCode.NOT_FOUND, f"model {request.model_name!r} is not served here; "
                                                                f"served: {', '.join(self._served.names)}")
            return None
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


class _RivaWriter(StreamWriter):
    """One StreamingRecognize call's responses: merges the scheduler's events with the arrival
    of audio messages (ResponsePacer) and writes one response per message. At most one event is
    taken ahead of the writes, so a slow reader is still held back by the scheduler's response
    buffer; while a write waits, a failure of the stream ends the call."""

    def __init__(self, call: StreamCall, options: RivaOptions, request_id: str, rate: int, frame_seconds: float):
        super().__init__(call)
        self.options, self.request_id, self.rate, self.frame_seconds = options, request_id, rate, frame_seconds
        self.pacer = ResponsePacer()
        self._wake = asyncio.Event()   # an audio message arrived
        self._latest: ChunkResult | None = None
        self._latest_ready: float | None = None  # its audio's completion, until a response carried it
        self._event_task: asyncio.Future | None = None
        self._wake_task: asyncio.Future | None = None

    def audio_of(self, request: rpb.StreamingRecognizeRequest) -> bytes:
        if request.WhichOneof("streaming_request") == "streaming_config":
            raise invalid("streaming_config sent twice: only the first request may carry it")
        check_runtime_config(request)
        return request.audio_content  # a request without audio still gets its response

    def message(self, samples: int) -> None:
        self.pacer.message(samples)
        self._wake.set()

    async def run(self) -> None:
        handle = self.call.handle
        while True:
            if self._wake_task is None:  # cleared before ready(): a message arriving meanwhile re-wakes
                self._wake.clear()
                self._wake_task = asyncio.ensure_future(self._wake.wait())
            await self._answer(self.pacer.ready())
            if self._event_task is None:
                self._event_task = asyncio.ensure_future(handle.next_event())
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
            self._latest, self._latest_ready = event, event.audio_ready_at
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
            self.call.mark_final()
            # At the final the scheduler is done with the stream: its place is free even while
            # the last responses wait on a slow reader.
            self.call.close("OK")
            await self._answer(total - 1)
            await self.call.write(streaming_response(event, self.options, self.frame_seconds, event.finals,
                                                     self.request_id, stream_over=True), ready_at=self._take_ready())
            return

    async def _answer(self, n: int, finals: tuple = (), extra: bool = False) -> None:
        """Write n responses, the last carrying `finals`; with `extra`, finals and no response
        due make one response more."""
        if finals and n == 0 and extra:
            n = 1
        for i in range(n):
            await self.call.write(streaming_response(self._latest, self.options, self.frame_seconds,
                                                     finals if i == n - 1 else (), self.request_id),
                                  ready_at=self._take_ready())

    def _take_ready(self) -> float | None:
        """The latest event's ready time for the first response that carries it (its latency is
        counted once; responses are paced by the client's messages, so that one may come later)."""
        ready, self._latest_ready = self._latest_ready, None
        return ready

    def taken_failure(self) -> StreamFailure | None:
        task = self._event_task
        if task is not None and task.done() and not task.cancelled() and isinstance(task.result(), StreamFailure):
            return task.result()
        return None

    def log_counts(self) -> dict:
        return {"messages": self.pacer.messages, "responses": self.pacer.answered}

    def cancel(self) -> None:
        for task in (self._event_task, self._wake_task):
            if task is not None:
                task.cancel()


def add_riva_servicer(servicer: RivaSpeechRecognitionServicer, server: grpc.aio.Server) -> None:
    rpb_grpc.add_RivaSpeechRecognitionServicer_to_server(servicer, server)

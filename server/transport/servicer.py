"""The native gRPC servicer (nemostream.v1): transport only. The call's flow (first request,
admission, the audio reader, the watched writes, statuses, metrics) is server.transport.call_skeleton's;
this module checks the native requests and builds the native responses. Every decision about
batching lives in server.scheduling.scheduler."""

from __future__ import annotations

import logging

from proto import asr_stream_pb2 as pb
from proto import asr_stream_pb2_grpc as pb_grpc
from server.transport.audio_decoder import AudioDecoder
from server.transport.call_limits import RecognizeBudget
from server.transport.call_skeleton import ApiNames, CallSkeleton, StreamCall, StreamWriter, TransportLimits
from server.ops.metrics import ServerMetrics
from server.transport.responses import final_result, streaming_response, whole_file_result
from server.scheduling.scheduler import Scheduler
from server.transport.stream_config import ServedModel, StreamOptions, invalid, validate_config
from server.scheduling.stream_events import ChunkResult, StreamError, StreamFailure, Utterance

log = logging.getLogger("nemostream.rpc")

NAMES = ApiNames(log=log, log_prefix="", method_prefix="", request_type=pb.StreamingRecognizeRequest.DESCRIPTOR.full_name,
                 config="the config", audio="audio", no_audio="requests")

# Trailing metadata of a stream the server ended itself, with a final result (max duration).


class SpeechRecognitionServicer(pb_grpc.SpeechRecognitionServicer):
    """The call's flow is server.transport.call_skeleton's; this class supplies the native API's half."""

    names = NAMES

    def __init__(self, scheduler: Scheduler, served: ServedModel, limits: TransportLimits, metrics: ServerMetrics,
                 budget: RecognizeBudget | None = None):
        self._scheduler = scheduler
        self._served = served
        self._limits = limits
        self._metrics = metrics
        self._frame_seconds = served.geometry.encoder_frame_seconds
        self._calls = CallSkeleton(self, scheduler, served, limits, metrics, budget)  # budget: shared with Riva's

    async def StreamingRecognize(self, request_iterator, context) -> None:
        await self._calls.streaming(request_iterator, context)

    async def Recognize(self, request: pb.RecognizeRequest, context):
        return await self._calls.recognize(request, context)

    # -- the native API's half of a call (server.transport.call_skeleton.Api) ------------------------------
    def stream_options(self, first: pb.StreamingRecognizeRequest | None) -> StreamOptions:
        if first is None:
            raise invalid("the stream ended before a config was sent")
        if first.WhichOneof("request") != "config":
            raise invalid("the first request must carry the config; got audio (or an empty request) first")
        return validate_config(first.config, self._served)

    def stream_writer(self, call: StreamCall, options: StreamOptions, first) -> StreamWriter:
        return _NativeWriter(call, options, self._frame_seconds)

    def recognize_options(self, request: pb.RecognizeRequest) -> StreamOptions:
        return validate_config(request.config, self._served)

    def recognize_response(self, request, options: StreamOptions, finals: list[Utterance], last: ChunkResult,
                           stream_id: str) -> pb.RecognizeResponse:
        response = pb.RecognizeResponse(result=whole_file_result(finals, self._frame_seconds),
                                        audio_processed=last.audio_seconds, stream_id=stream_id)
        if options.endpointing is not None:
            response.utterances.extend(final_result(u, self._frame_seconds) for u in finals)
        return response

    def decoder(self, options: StreamOptions) -> AudioDecoder:
        return AudioDecoder(options.audio, self._served.geometry.sample_rate, self._limits.max_header_bytes)

    def log_fields(self, options: StreamOptions, rpc: str) -> dict:
        spec = options.audio
        return {"sample_rate": spec.sample_rate, "encoding": spec.encoding.value if spec.encoding else "auto",
                "interim": options.interim_results}

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


class _NativeWriter(StreamWriter):
    """One response per event of the stream: a result per chunk (with or without interim text),
    the final last."""

    def __init__(self, call: StreamCall, options: StreamOptions, frame_seconds: float):
        super().__init__(call)
        self.options, self.frame_seconds = options, frame_seconds
        self.chunks = 0

    def audio_of(self, request: pb.StreamingRecognizeRequest) -> bytes | None:
        kind = request.WhichOneof("request")
        if kind == "config":
            raise invalid("config sent twice: only the first request may carry a config")
        if kind == "end_utterance" and request.end_utterance:
            self.call.handle.end_utterance()  # (like a keep-alive, it does not move the idle deadline)
        return request.audio if kind == "audio" and request.audio else None  # an empty request carries nothing

    async def run(self) -> None:
        handle = self.call.handle
        while (event := await handle.next_event()) is not None:
            if isinstance(event, StreamFailure):
                raise StreamError(event.kind, event.message)
            self.chunks += 1
            response = streaming_response(event, self.options.interim_results, self.frame_seconds)
            if event.is_final:
                self.call.mark_final()
            # The stream stays open (for admission and drain) until its final is written; a
            # write that waits on a client that does not read ends in UnreadClient.
            await self.call.write(response, "final result" if event.is_final else "result", event.audio_ready_at)

    def log_counts(self) -> dict:
        return {"chunks": self.chunks}

"""Helpers of the Riva API tests: stubs from proto/riva, request builders, sync calls."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from proto.riva import riva_asr_pb2 as rpb
from proto.riva import riva_asr_pb2_grpc as rpb_grpc
from server.service.app import AsrServer
from tests.server_harness import RATE

_OPTIONS = [("grpc.max_send_message_length", 64 << 20)]


def riva_config(**fields) -> rpb.RecognitionConfig:
    """A config as Riva's scripts build it: verbatim transcripts, one alternative."""
    fields.setdefault("verbatim_transcripts", True)
    fields.setdefault("max_alternatives", 1)
    return rpb.RecognitionConfig(**fields)


def raw_config(**fields) -> rpb.RecognitionConfig:
    fields.setdefault("sample_rate_hertz", RATE)
    fields.setdefault("encoding", 1)  # LINEAR_PCM
    return riva_config(**fields)


def stream_requests(config: rpb.RecognitionConfig, pieces, interim_results: bool = True,
                    request_id: str = "") -> list[rpb.StreamingRecognizeRequest]:
    first = rpb.StreamingRecognizeRequest(streaming_config=rpb.StreamingRecognitionConfig(
        config=config, interim_results=interim_results))
    if request_id:
        first.id.value = request_id
    return [first, *(rpb.StreamingRecognizeRequest(audio_content=p) for p in pieces)]


@contextlib.asynccontextmanager
async def riva_stub_for(server: AsrServer):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=_OPTIONS) as channel:
        yield rpb_grpc.RivaSpeechRecognitionStub(channel)


async def riva_stream(stub, requests) -> list[rpb.StreamingRecognizeResponse]:
    async def gen():
        for r in requests:
            yield r

    return [r async for r in stub.StreamingRecognize(gen())]


async def riva_sync(server: AsrServer, method: str, request):
    """A call through the sync gRPC API in a thread (for error statuses: see run_stream_sync)."""
    def call():
        with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=_OPTIONS) as channel:
            stub = rpb_grpc.RivaSpeechRecognitionStub(channel)
            if method == "StreamingRecognize":
                return list(stub.StreamingRecognize(iter(request)))
            return getattr(stub, method)(request)

    return await asyncio.to_thread(call)


def riva_final(responses) -> rpb.StreamingRecognitionResult:
    finals = [r.results[0] for r in responses if r.results and r.results[0].is_final]
    assert len(finals) == 1, f"expected one final, got {len(finals)}"
    assert responses[-1].results and responses[-1].results[0].is_final, "the final is the last response"
    return finals[0]

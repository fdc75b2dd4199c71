"""A finished call leaves no reference cycle behind: its stream's state, its writer, its read and
write watches and whatever audio it still held are freed when the handler returns, not at the
garbage collector's next run.

Why it matters: a serving process collects rarely (its thresholds are raised after warm-up,
server.runtime.gc_policy), so cyclic garbage from every ended call piles up between
collections, with the audio queued in it, and each collection that does run walks it while
every stream of the process waits. Before the fix each ended call left about 30 objects in
cycles (a deadline holding its owner's bound method, a call and its writer pointing at each
other).

A call refused with a status is covered too (the servicers' refusals and the security layer's):
grpc's `context.abort` raised an AbortError whose traceback grpc's own handler frame held, a cycle
that took the handler's frame (and the call, and what it had read) with it, so refusals now set
the status and return; and the refusal's drain of the client's requests read through
asyncio.wait_for, whose task held the half-close's StopAsyncIteration in a cycle linked to the
refusal's error. An abusive client's storm of refused calls would otherwise pile up until a
collection.

Each case runs one kind of call on a real server on a loopback port, through the in-process
path and through the frontend <-> engine-process wire, then collects with DEBUG_SAVEALL and
lists the unreachable objects of this project's server modules and the frames of its code
(grpc's own per-call cycle, five objects of its handler lookup, is not ours and is left out).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import types
from pathlib import Path

import grpc
import pytest

from proto import asr_stream_pb2 as pb
from tests.riva_harness import raw_config, riva_stream, riva_stub_for, stream_requests
from tests.server_harness import (FAKE, audio, config, final_transcript, make_engine, pcm16_audio, requests_for, run_stream,
                                  running_server, stub_for, wav_bytes)

SERVER_DIR = Path(__file__).resolve().parent.parent / "server"
BOTH_PATHS = pytest.mark.parametrize("server_path", ["local", "wire"], indirect=True)


def our_garbage() -> collections.Counter:
    """Types (module.name) of this project's server objects that only the collector can free,
    among what became unreachable since the last collection."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
                                    if type(o).__module__.startswith("server."))
        # and the frames of our code kept with them (a handler's frame holds what it read)
        found.update(f"frame of {f.f_code.co_qualname} ({SERVER_DIR.name}/{Path(f.f_code.co_filename).relative_to(SERVER_DIR)})"
                     for f in gc.garbage if isinstance(f, types.FrameType) and Path(f.f_code.co_filename).is_relative_to(SERVER_DIR))
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
    return found


async def native_complete(server) -> None:
    async with stub_for(server) as stub:
        responses = await run_stream(stub, requests_for(wav_bytes(pcm16_audio(3, 16000 * 2))))
    assert final_transcript(responses)


async def riva_complete(server) -> None:
    async with riva_stub_for(server) as stub:
        pcm = pcm16_audio(4, 16000 * 2)
        responses = await riva_stream(stub, stream_requests(raw_config(), [pcm.tobytes()]))
    assert responses


async def native_cancelled(server) -> None:
    async with stub_for(server) as stub:
        chunk = pcm16_audio(5, 16000).tobytes()
        first_response = asyncio.Event()

        async def requests():
            yield config()
            yield audio(chunk)
            await first_response.wait()
            await asyncio.sleep(3600)  # held open until the client cancels

        call = stub.StreamingRecognize(requests())
        async for _ in call:
            first_response.set()
            break
        call.cancel()
    await asyncio.sleep(0.5)  # the server sees the cancellation and ends its handler


async def native_refused(server) -> None:
    """A stream refused after its first request (a sample rate no stream may have)."""
    async with stub_for(server) as stub:
        call = stub.StreamingRecognize(iter([config(sample_rate=3), audio(pcm16_audio(6, 1600).tobytes())]))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def riva_refused(server) -> None:
    async with riva_stub_for(server) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await riva_stream(stub, stream_requests(raw_config(sample_rate_hertz=3), [pcm16_audio(7, 1600).tobytes()]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def native_recognize_refused(server) -> None:
    async with stub_for(server) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Recognize(pb.RecognizeRequest(config=pb.RecognitionConfig(sample_rate=3, encoding=pb.PCM16),
                                                     audio=pcm16_audio(8, 1600).tobytes()))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@BOTH_PATHS
@pytest.mark.parametrize("case", [native_complete, riva_complete, native_cancelled, native_refused, riva_refused,
                                  native_recognize_refused],
                         ids=lambda f: f.__name__)
async def test_an_ended_call_leaves_no_cycle_of_server_objects(server_path, case):
    engine = make_engine(FAKE)
    async with running_server(engine) as server:
        await native_complete(server)  # warm: first-call caches, lazily made objects
        await asyncio.sleep(0.2)
        gc.collect()  # what start-up and the warm-up left
        for _ in range(3):
            await case(server)
        await asyncio.sleep(0.3)  # handlers finished, closes reached the engine side
        left = our_garbage()
    assert not left, f"ended calls left server objects in reference cycles: {dict(left)}"


@BOTH_PATHS
async def test_a_refused_client_leaves_no_cycle_of_server_objects(server_path):
    """The security layer's refusals (no token; a client past its streams) end their calls with a
    status and leave nothing for the collector, as the servicers' refusals do."""
    from server.transport.security import SecuritySettings, parse_tokens

    alice = "alice-0123456789abcdef"
    security = SecuritySettings(tokens=parse_tokens(f"alice {alice}", "test"), max_streams_per_client=1)
    engine = make_engine(FAKE)
    async with running_server(engine, security=security) as server:
        token = (("authorization", f"Bearer {alice}"),)
        chunk = pcm16_audio(9, 1600).tobytes()
        held_open, release = asyncio.Event(), asyncio.Event()

        async def held_requests():
            yield config()
            yield audio(pcm16_audio(10, 8000).tobytes())  # half a second: a chunk's result comes back
            held_open.set()
            await release.wait()

        async with stub_for(server) as stub:
            held = stub.StreamingRecognize(held_requests(), metadata=token)
            first = asyncio.ensure_future(held.read())
            await held_open.wait()
            await first
            gc.collect()  # what start-up, the first call and the held stream left
            codes = []
            for _ in range(3):
                for metadata in ((), token):  # no token: UNAUTHENTICATED; alice's second: RESOURCE_EXHAUSTED
                    call = stub.StreamingRecognize(iter([config(), audio(chunk)]), metadata=metadata)
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        async for _ in call:
                            pass
                    codes.append(refused.value.code())
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Recognize(pb.RecognizeRequest(config=config().config, audio=chunk), metadata=token)
                codes.append(refused.value.code())
            await asyncio.sleep(0.3)
            left = our_garbage()
            release.set()
            held.cancel()
    assert codes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                     grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    assert not left, f"refused calls left server objects in reference cycles: {dict(left)}"

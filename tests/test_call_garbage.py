"""A finished call leaves no reference cycle behind: its stream's state, its writer, its read and
write watches and whatever audio it still held are freed when the handler returns, not at the
garbage collector's next run.

Why it matters: a serving process collects rarely (its thresholds are raised after warm-up,
server.runtime.gc_policy), so cyclic garbage from every ended call piles up between
collections, with the audio queued in it, and each collection that does run walks it while
every stream of the process waits. Before the fix each ended call left about 30 objects in
cycles (a deadline holding its owner's bound method, a call and its writer pointing at each
other).

A call refused with a status is not covered: grpc's `context.abort` raises its AbortError,
whose traceback runs through grpc's own handler frame that holds it, a cycle of grpc's that
takes the handler's frame (and so the call) with it until a collection. Refusals are the rare
path; the streams that end normally or are cancelled by their client are the traffic.

Each case runs one kind of call on a real server on a loopback port, through the in-process
path and through the frontend <-> engine-process wire, then collects with DEBUG_SAVEALL and
lists the unreachable objects of this project's server modules (grpc's own per-call cycle,
five objects of its handler lookup, is not ours and is left out).
"""

from __future__ import annotations

import asyncio
import collections
import gc

import pytest

from tests.riva_harness import raw_config, riva_stream, riva_stub_for, stream_requests
from tests.server_harness import (FAKE, audio, config, final_transcript, make_engine, pcm16_audio, requests_for, run_stream,
                                  running_server, stub_for, wav_bytes)

BOTH_PATHS = pytest.mark.parametrize("server_path", ["local", "wire"], indirect=True)


def our_garbage() -> collections.Counter:
    """Types (module.name) of this project's server objects that only the collector can free,
    among what became unreachable since the last collection."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
                                    if type(o).__module__.startswith("server."))
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


@BOTH_PATHS
@pytest.mark.parametrize("case", [native_complete, riva_complete, native_cancelled],
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

"""server/transport/unread_client.py: a response write left behind when its handler ends.

A handler that ends while its write waits on the client (the client cancelled the call, the
server stopped it) leaves that write to gRPC; when gRPC then fails it (the call is gone), the
failure is nobody's to report. Before, asyncio logged "Task exception was never retrieved" with
a traceback for each such write (run 44: hundreds, when a load generator gave up on its streams).
"""

from __future__ import annotations

import asyncio
import gc
import time

from server.scheduling.stream_state import StreamState
from server.transport.unread_client import WatchedWrites


class _Context:
    """A call whose writes wait until `release` is set, then fail as grpc's do once the call is gone."""

    def __init__(self):
        self.release = asyncio.Event()
        self.written = []

    async def write(self, response):
        await self.release.wait()
        raise RuntimeError(f"execute_batch failed for {response!r}")


async def test_a_write_left_behind_by_a_cancelled_handler_fails_without_an_unretrieved_error():
    loop = asyncio.get_running_loop()
    reported = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx.get("message")))
    try:
        ctx = _Context()
        writes = WatchedWrites(ctx, StreamState("s1", 0, "s1", time.monotonic()), lambda: None, idle_timeout_s=30.0)
        handler = asyncio.ensure_future(writes.write("r1"))
        await asyncio.sleep(0.01)
        handler.cancel()  # the client went away: gRPC cancels the handler while its write waits
        await asyncio.gather(handler, return_exceptions=True)
        ctx.release.set()  # then gRPC fails the write it still held
        for _ in range(5):
            await asyncio.sleep(0)
        writes.close()
        del handler, writes
        gc.collect()
        await asyncio.sleep(0)
        assert not [m for m in reported if "never retrieved" in (m or "")], reported
    finally:
        loop.set_exception_handler(None)


async def test_a_write_that_fails_while_its_handler_waits_still_raises_there():
    ctx = _Context()
    writes = WatchedWrites(ctx, StreamState("s1", 0, "s1", time.monotonic()), lambda: None, idle_timeout_s=30.0)
    handler = asyncio.ensure_future(writes.write("r1"))
    await asyncio.sleep(0.01)
    ctx.release.set()
    try:
        await handler
    except RuntimeError as e:
        assert "execute_batch failed for 'r1'" in str(e)
    else:
        raise AssertionError("the write's failure did not reach the handler")
    finally:
        writes.close()

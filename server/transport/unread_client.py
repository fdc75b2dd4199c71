"""Writing responses to a client that may stop reading, shared by the native and Riva servicers.

A response write waits while the client does not read (HTTP/2 flow control). The wait watches
the stream: if the stream fails meanwhile (its buffers filled up, it idled) or the client reads
nothing for the idle timeout, it ends with UnreadClient, so the handler frees the stream's place
at once instead of when gRPC lets go of the call. A failure that does not come from a slow
client lets the write in flight finish first (WRITE_GRACE_S), so that the status goes out after it.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import grpc

from server.scheduling.stream_events import ErrorKind, StreamFailure
from server.scheduling.stream_state import StreamState
from server.transport.lazy_deadline import LazyDeadline


# How long a write in flight when its stream fails may still take before the client counts as
# not reading: a reading client takes a response within a round trip.
WRITE_GRACE_S = 0.5
# Failures that say the client does not keep up (its results or audio piled up, it idled): the
# write they interrupt waits on that client, so the wait ends at once.
CLIENT_NOT_KEEPING_UP = frozenset({ErrorKind.RESOURCE_EXHAUSTED, ErrorKind.DEADLINE_EXCEEDED})


class UnreadClient(Exception):
    """The stream ended while a response write waited on a client that does not read."""

    def __init__(self, kind: ErrorKind, message: str, write: asyncio.Future):
        super().__init__(message)
        self.kind, self.message, self.write = kind, message, write


def forget(future: asyncio.Future) -> None:
    """A future left to finish on its own (or never): its outcome is not an error to report."""
    future.add_done_callback(lambda f: f.cancelled() or f.exception())


class WatchedWrites:
    """The response writes of one call, each watched: it ends with UnreadClient when `failure()`
    names a failure or the client reads nothing for idle_timeout_s while it waits.

    One per call, made by the task that writes: one LazyDeadline for all of the call's writes and
    one bound callback, where a timer, a closure and a callback per write cost about a tenth of a
    bare grpc.aio server's CPU per chunk (bench/grpc_overhead.py). `close()` when the call ends."""

    def __init__(self, context, state: StreamState, failure: Callable[[], StreamFailure | None],
                 idle_timeout_s: float):
        self._context, self._failure, self._idle = context, failure, idle_timeout_s
        # One event wakes a waiting write: the write finishing, the stream's next event or
        # failure, or the idle deadline. A callback and a timer cost far less per response than
        # a watcher task and asyncio.wait (bench/host_overhead.py).
        self._wake = state.events_ready
        self._deadline = LazyDeadline(self._expire)
        self._expired = False  # a flag, not the clock: a timer may fire a hair early

    def _write_done(self, _write: asyncio.Future) -> None:
        self._wake.set()

    def _expire(self) -> None:
        self._expired = True
        self._wake.set()

    async def write(self, response) -> None:
        write = asyncio.ensure_future(self._context.write(response))
        write.add_done_callback(self._write_done)
        # A handler that ends while this write waits (the client cancelled the call) leaves it to
        # gRPC, which fails it once the call is gone: nobody's error to report. Here below, a
        # failure still reaches the handler (write.result()).
        forget(write)
        self._expired = False
        self._deadline.arm(self._idle)
        wake = self._wake
        try:
            while not write.done():
                failed = self._failure()
                if failed is not None and failed.kind not in CLIENT_NOT_KEEPING_UP:
                    # The stream failed for another reason (a bad request, an engine fault) while
                    # this write was in flight. A client that reads takes the response within
                    # moments, and the status must go out after the write, not beside it: an abort
                    # while a write is pending left a half-closed client of the sync API waiting
                    # for a status forever (grpcio 1.85, tests/test_server_errors.py).
                    await asyncio.wait((write,), timeout=min(WRITE_GRACE_S, self._idle))
                    if write.done():
                        break  # the handler takes the failure from the stream next
                if failed is not None:
                    raise UnreadClient(failed.kind, failed.message, write)
                if self._expired:
                    raise UnreadClient(ErrorKind.DEADLINE_EXCEEDED,
                                       f"the client read no response for {self._idle:g} s", write)
                wake.clear()  # set again by the stream's next event or failure
                await wake.wait()
        finally:
            self._deadline.disarm()
        write.result()

    def close(self) -> None:
        self._deadline.close()


async def abort_unread(context, exc: UnreadClient, idle_timeout_s: float) -> None:
    """End a call whose client does not read: the status queues behind the unsent responses
    (the client sees it once it reads); wait for it at most idle_timeout_s, then leave the call
    to gRPC (its memory is bounded by the flow-control window). Returns only in that last case."""
    forget(exc.write)
    abort = asyncio.ensure_future(context.abort(grpc.StatusCode[exc.kind.value], exc.message))
    forget(abort)
    done, _ = await asyncio.wait((abort,), timeout=idle_timeout_s)
    if done:
        abort.result()  # raises grpc's AbortError, which ends the handler as an abort should

"""Reading the next request of a stream with an idle timeout, at little cost per message.

`asyncio.wait_for` wraps the read in a new Task (and before Python 3.12 it always does), which at
thousands of messages per second is a large share of the event loop's time per chunk
(bench/host_overhead.py). `asyncio.timeout` (3.11+) only arms a timer on the current task, but
it still makes a Timeout, a timer handle and a cancelled timer per message: with a bare grpc.aio
echo server at 300 streams of 160 ms chunks, 70 us of server CPU per chunk became 87 us with it
(bench/grpc_overhead.py). `IdleReads` times a task's reads with one LazyDeadline, which cancels
the task only if a read still waits past its deadline.
"""

from __future__ import annotations

import asyncio

from server.transport.lazy_deadline import LazyDeadline


async def next_within(iterator, timeout_s: float):
    """The iterator's next item; TimeoutError after timeout_s, StopAsyncIteration at its end.
    For a single read (the first request, say); a loop of reads takes IdleReads."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(timeout_s):
            return await iterator.__anext__()
    try:  # Python 3.10
        return await asyncio.wait_for(iterator.__anext__(), timeout_s)
    except asyncio.TimeoutError:  # not yet the builtin TimeoutError on 3.10
        raise TimeoutError from None


class IdleReads:
    """Reads of one task, each within its own timeout, under one LazyDeadline.

    Made in the task that reads (it is the one cancelled when a read outlives its deadline);
    `close()` when done reading. A deadline that passes while the task awaits something else is
    not enforced: only reads are timed, as with asyncio.timeout around each read."""

    def __init__(self) -> None:
        self._task = asyncio.current_task()
        self._deadline = LazyDeadline(self._expire)
        self._expired = False
        # Task.uncancel (3.11+) tells our cancellation from another's; without it, per-read timeouts.
        self._lazy = hasattr(self._task, "uncancel")

    async def next(self, iterator, timeout_s: float):
        """The iterator's next item; TimeoutError after timeout_s, StopAsyncIteration at its end."""
        if not self._lazy:
            return await next_within(iterator, timeout_s)
        self._deadline.arm(timeout_s)
        try:
            return await iterator.__anext__()
        except asyncio.CancelledError:
            if self._expired:
                self._expired = False
                if self._task.uncancel() == 0:  # ours alone: the read timed out
                    raise TimeoutError from None
            raise
        finally:
            self._deadline.disarm()

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()

    def close(self) -> None:
        self._deadline.close()

"""Reading the next request of a stream with an idle timeout, without a task per message.

`asyncio.wait_for` wraps the read in a new Task (and before Python 3.12 it always does), which at
thousands of messages per second is a large share of the event loop's time per chunk
(bench/host_overhead.py). `asyncio.timeout` (3.11+) only arms a timer on the current task.
"""

from __future__ import annotations

import asyncio

if hasattr(asyncio, "timeout"):
    async def next_within(iterator, timeout_s: float):
        """The iterator's next item; TimeoutError after timeout_s, StopAsyncIteration at its end."""
        async with asyncio.timeout(timeout_s):
            return await iterator.__anext__()
else:  # Python 3.10
    async def next_within(iterator, timeout_s: float):
        """The iterator's next item; TimeoutError after timeout_s, StopAsyncIteration at its end."""
        try:
            return await asyncio.wait_for(iterator.__anext__(), timeout_s)
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on 3.10
            raise TimeoutError from None

"""Calling onto an asyncio event loop: from another thread, and once per loop iteration.

Its own module because both sides of the engine boundary need it: the scheduler (an engine's
death watch fires on another thread), the engine worker's reader thread (a reply arrived), and
the processes' links, which gather what one iteration's events add (a frame of results, a state
message, the frontends' Written counts) and send it once.
The engine worker sits below the scheduler that drives it (pyproject.toml's engine-worker-lean
contract keeps the scheduling core out of it), so it cannot import this from
server.scheduling.scheduler.
"""

from __future__ import annotations

import asyncio


def call_soon_from_thread(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """From another thread: run fn on the loop, unless the loop has already closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


class OncePerIteration:
    """`request()` runs `callback` on the running loop's next iteration, once however often it
    was requested before then."""

    __slots__ = ("_callback", "_pending")

    def __init__(self, callback) -> None:
        self._callback = callback
        self._pending = False

    def request(self) -> None:
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        self._pending = False
        self._callback()

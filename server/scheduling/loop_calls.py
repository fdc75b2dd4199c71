"""Calling onto an asyncio event loop from another thread.

Its own module because both sides of the engine boundary need it: the scheduler (an engine's
death watch fires on another thread) and the engine worker's reader thread (a reply arrived).
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

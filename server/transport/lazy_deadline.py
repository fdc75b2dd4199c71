"""A deadline that moves at the cost of writing a number: one timer, re-armed lazily.

A stream's reads and a call's writes each run under an idle deadline that moves with every
message. Arming and cancelling a timer per message (what asyncio.timeout does) cost a bare
grpc.aio server about a fifth of its CPU per chunk (bench/grpc_overhead.py). Here the timer, when
it fires, re-arms itself at the deadline as it stands then, and calls `on_expiry` only if that
deadline has passed while armed. Used by server.transport.idle_read.IdleReads and
server.transport.unread_client.WatchedWrites.
"""

from __future__ import annotations

import asyncio
from typing import Callable


class LazyDeadline:
    """Made on the loop that times; `close()` when done, so the timer does not hold its owner
    for a whole timeout."""

    def __init__(self, on_expiry: Callable[[], None]):
        self._loop = asyncio.get_running_loop()
        self._on_expiry = on_expiry
        self._deadline: float | None = None  # loop time; None while nothing is timed
        self._timer: asyncio.TimerHandle | None = None

    def arm(self, timeout_s: float) -> None:
        """From now, `timeout_s` until the expiry, unless disarmed first."""
        deadline = self._loop.time() + timeout_s
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:  # a shorter timeout than the armed one
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._check)

    def disarm(self) -> None:
        self._deadline = None  # the timer, when it fires, finds nothing to time

    def _check(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return  # disarmed: the next arm() starts a timer again
        if self._loop.time() < deadline:  # the deadline moved since this timer was armed
            self._timer = self._loop.call_at(deadline, self._check)
            return
        self._deadline = None
        self._on_expiry()

    def close(self) -> None:
        """No expiry any more. Also lets go of `on_expiry`: it is a method of the owner, which
        holds this deadline, and the cycle would keep the owner (and what it holds of its call)
        until the garbage collector's next run instead of freeing it when the call ends."""
        self._deadline = None
        self._on_expiry = _expired_after_close
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _expired_after_close() -> None:
    """A closed deadline's expiry: never called (close cancels the timer and clears the
    deadline), there so that the class keeps one shape."""

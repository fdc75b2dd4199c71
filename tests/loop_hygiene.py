"""The tests' event loops close the subprocess transports their tests left open.

A test that starts a process with asyncio (`asyncio.create_subprocess_exec`: a real `asr-server`,
a client CLI) and does not read its pipes to the end leaves the process's transport open: the
pipe readers pause once the unread output fills their buffer, so they never see the end of the
output. The transport is then finalized by a garbage collection after pytest-asyncio closed the
test's loop, and its `__del__` fails with "Event loop is closed". That failure goes to the
unraisable-exception hook, which formats its traceback: on Python 3.11 the traceback module
parses source lines with `ast`, and a collection that lands inside another `ast.parse` (pytest's
assertion rewriting of a module imported late, say Hypothesis's plugin at the run's summary)
corrupts the parser's recursion count: "SystemError: AST constructor recursion depth mismatch"
(python/cpython#106905), which ends the whole run with an internal error. It was seen in 2 of
10 runs of one test file here.

So each test's loop records the subprocess transports made on it and, when it closes, closes
those still open (killing a process still running, as BaseSubprocessTransport.close does) and
runs the loop once more so their pipes' callbacks complete on a live loop.
"""

from __future__ import annotations

import asyncio
import weakref


class ReapingEventLoop(asyncio.SelectorEventLoop):
    """A selector loop that closes its leftover subprocess transports when it closes."""

    def __init__(self) -> None:
        super().__init__()
        self._subprocesses: weakref.WeakSet = weakref.WeakSet()

    async def subprocess_exec(self, *args, **kwargs):
        transport, protocol = await super().subprocess_exec(*args, **kwargs)
        self._subprocesses.add(transport)
        return transport, protocol

    async def subprocess_shell(self, *args, **kwargs):
        transport, protocol = await super().subprocess_shell(*args, **kwargs)
        self._subprocesses.add(transport)
        return transport, protocol

    def open_subprocesses(self) -> list:
        return [t for t in self._subprocesses if not t.is_closing()]

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            left = self.open_subprocesses()
            for transport in left:
                transport.close()
            if left:  # the pipes' connection_lost callbacks were scheduled on this loop
                self.run_until_complete(asyncio.sleep(0))
                self.run_until_complete(asyncio.sleep(0))
        super().close()


class ReapingLoopPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return ReapingEventLoop()

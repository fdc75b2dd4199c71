"""The tests' event loops (tests/loop_hygiene.py): a subprocess transport a test leaves open is
closed when its loop closes, so no finalizer runs on a closed loop later."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import subprocess
import sys
import time
import weakref

from tests.loop_hygiene import ReapingEventLoop, ReapingLoopPolicy


def leave_a_process_open(loop: asyncio.AbstractEventLoop):
    """A process writing more output than its pipe buffer takes, never read, never waited for:
    what a test that starts a server and does not read its logs leaves behind."""
    async def start():
        return await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys, time; sys.stderr.write('x' * 400_000); sys.stderr.flush(); time.sleep(60)",
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    proc = loop.run_until_complete(start())
    loop.run_until_complete(asyncio.sleep(0.5))  # its output fills the reader's buffer: reading pauses
    return proc


def test_the_loop_closes_what_its_tests_left_open_and_the_process_ends():
    loop = ReapingLoopPolicy().new_event_loop()
    assert isinstance(loop, ReapingEventLoop)
    proc = leave_a_process_open(loop)
    (transport,) = loop.open_subprocesses()
    pid = transport.get_pid()
    loop.close()
    assert transport.is_closing()
    assert gone(pid), f"process {pid} still runs after its loop closed"  # killed by the close, reaped
    del proc, transport
    gc.collect()  # and its finalizer has nothing left to do (an unraisable error would be reported)


def gone(pid: int, timeout_s: float = 10.0) -> bool:
    """True once the process has exited and been reaped (by asyncio's child watcher)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                f.read()
        except (FileNotFoundError, ProcessLookupError):  # gone before the open, or between it and the read
            return True
        time.sleep(0.05)
    return False


def test_without_it_the_transport_fails_on_a_closed_loop_at_collection():
    """What the reaping prevents, shown on a plain loop (so the first test is not vacuous): the
    transport's finalizer fails on the closed loop, into the unraisable-exception hook."""
    seen = []
    hook, sys.unraisablehook = sys.unraisablehook, seen.append
    try:
        loop = asyncio.SelectorEventLoop()
        proc = leave_a_process_open(loop)
        pid = proc.pid
        transport = weakref.ref(proc._transport)
        loop.close()
        subprocess.run(["kill", "-9", str(pid)], check=False)
        assert gone(pid)
        del proc
        deadline = time.monotonic() + 10
        while transport() is not None and time.monotonic() < deadline:
            gc.collect()  # once the child watcher's thread has let go of it, the transport is garbage
            time.sleep(0.05)
    finally:
        sys.unraisablehook = hook
        left = transport() if "transport" in locals() else None
        if left is not None:  # not collected here: do not leave its failing finalizer to a later test
            with contextlib.suppress(RuntimeError):
                left.close()
    assert any("Event loop is closed" in str(u.exc_value) for u in seen), [str(u.exc_value) for u in seen]

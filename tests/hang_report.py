"""A test that runs too long prints where it stands before pytest-timeout fails it.

pytest-timeout's failure shows the main thread's stack, which for an asyncio test that waits
forever is only the event loop's select(): it names no await. This reporter, armed per test,
prints every thread's stack and, for each running event loop, every task's coroutine stack,
so that a hang in CI says which await never completed.
"""

from __future__ import annotations

import asyncio
import gc
import io
import sys
import threading
import traceback
import types
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)


def thread_stacks() -> str:
    """Every thread's stack (what faulthandler prints, into any text stream)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = io.StringIO()
    for ident, frame in sys._current_frames().items():
        print(f"Thread {names.get(ident, ident)} (most recent call last):", file=out)
        out.writelines(traceback.format_stack(frame))
    return out.getvalue()


def running_loops() -> list[asyncio.AbstractEventLoop]:
    return [obj for obj in gc.get_objects() if isinstance(obj, asyncio.AbstractEventLoop) and obj.is_running()]


def task_stacks(loop: asyncio.AbstractEventLoop) -> str:
    """Every task of a loop and where its coroutine waits; call on the loop's thread."""
    out = io.StringIO()
    for task in asyncio.all_tasks(loop):
        try:
            print(f"--- {task!r}", file=out)
            task.print_stack(limit=20, file=out)
        except Exception as exc:  # a report must not stop at one odd task
            print(f"(its stack could not be printed: {exc!r})", file=out)
    return out.getvalue()


def suspended_coroutines(under: str) -> str:
    """Every suspended coroutine and async generator whose code lies under a folder. gRPC's
    Cython coroutines cannot print their tasks' stacks, so the handlers they await show here."""
    lines = []
    for obj in gc.get_objects():
        if isinstance(obj, types.CoroutineType):
            frame = obj.cr_frame
        elif isinstance(obj, types.AsyncGeneratorType):
            frame = obj.ag_frame
        else:
            continue
        if frame is None:
            continue
        code = frame.f_code
        if code.co_filename.startswith(under) and "/.venv/" not in code.co_filename:
            lines.append(f"  {code.co_filename}:{frame.f_lineno} in {code.co_qualname}")
    return "\n".join(sorted(lines))


class HangReporter:
    """Arms a timer for one test; when it fires, writes the report to stderr."""

    def __init__(self, test_id: str, after_s: float, capture_manager=None):
        self.test_id = test_id
        # pytest captures file descriptor 2 during a test: the report suspends that capture so
        # that it reaches the log at once, even if the whole run is killed later.
        self._capture = capture_manager
        self._timer = threading.Timer(after_s, self._report)
        self._timer.daemon = True
        self._after_s = after_s
        self.written = threading.Event()  # set once a report has been written out in full

    def __enter__(self) -> HangReporter:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def _report(self) -> None:
        if self._capture is not None:
            self._capture.suspend_global_capture(in_=False)
        try:
            self._write(sys.stderr)
        finally:
            if self._capture is not None:
                self._capture.resume_global_capture()
            self.written.set()

    def _write(self, err) -> None:
        print(f"\n=== {self.test_id} still running after {self._after_s:.0f} s: threads and tasks ===", file=err)
        print(thread_stacks(), file=err)
        for loop in running_loops():
            done = threading.Event()

            def dump(loop=loop):
                try:
                    print(task_stacks(loop), file=err)
                except Exception as exc:
                    print(f"tasks of {loop!r} could not be listed: {exc!r}", file=err)
                finally:
                    done.set()

            loop.call_soon_threadsafe(dump)
            if not done.wait(5.0):
                print(f"loop {loop!r} did not run the dump within 5 s: it is blocked (see the threads above)", file=err)
        print("suspended coroutines of the project:", file=err)
        try:
            print(suspended_coroutines(ROOT), file=err)
        except Exception as exc:
            print(f"(could not be listed: {exc!r})", file=err)
        err.flush()

"""IdleReads: per-read timeouts of one task with one lazily re-armed timer (server.transport.idle_read).
The server's idle-timeout behaviour through a real gRPC server is in tests/test_server_errors.py."""

from __future__ import annotations

import asyncio
import sys

import pytest

from server.transport.idle_read import IdleReads

pytestmark = pytest.mark.asyncio


class Source:
    """An async iterator fed by the test: items put come out in order; end() stops it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.queue.get()
        if item is StopAsyncIteration:
            raise StopAsyncIteration
        return item


async def test_reads_that_come_in_time_never_time_out_and_one_timer_serves_them():
    source = Source()
    reads = IdleReads()
    timers = []
    loop = asyncio.get_running_loop()
    real_call_at = loop.call_at

    def counting_call_at(when, callback, *args, **kwargs):
        if getattr(callback, "__self__", None) is reads._deadline:  # its LazyDeadline
            timers.append(when)
        return real_call_at(when, callback, *args, **kwargs)

    loop.call_at = counting_call_at  # type: ignore[method-assign]
    try:
        for i in range(40):
            loop.call_later(0.005, source.queue.put_nowait, i)
            assert await reads.next(source, 0.05) == i  # each read within 50 ms; 40 reads take 200 ms
    finally:
        loop.call_at = real_call_at  # type: ignore[method-assign]
        reads.close()
    # The timer fired (every 50 ms at most) and re-armed at the moved deadline: a few timers for
    # 40 reads, where a timer per read would be 40.
    assert 1 <= len(timers) < 20, timers


async def test_a_read_past_its_deadline_raises_timeout_error_and_the_task_goes_on():
    source = Source()
    reads = IdleReads()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await reads.next(source, 0.05)
    assert loop.time() - started >= 0.045
    # The task was not left cancelled: it awaits normally, and a later read works.
    await asyncio.sleep(0)
    source.queue.put_nowait("late")
    assert await reads.next(source, 0.05) == "late"
    if sys.version_info >= (3, 11):
        assert asyncio.current_task().cancelling() == 0
    reads.close()


async def test_a_shorter_timeout_than_the_armed_one_is_kept():
    source = Source()
    reads = IdleReads()
    source.queue.put_nowait(1)
    assert await reads.next(source, 30.0) == 1  # arms a timer 30 s away
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await reads.next(source, 0.05)  # must not wait for the 30 s timer
    assert loop.time() - started < 5.0
    reads.close()


async def test_time_spent_outside_reads_does_not_count():
    source = Source()
    reads = IdleReads()
    source.queue.put_nowait(1)
    assert await reads.next(source, 0.05) == 1
    await asyncio.sleep(0.12)  # past the last read's deadline, but no read waits: no cancellation
    source.queue.put_nowait(2)
    assert await reads.next(source, 0.05) == 2
    reads.close()


async def test_an_outside_cancellation_is_not_taken_for_a_timeout():
    source = Source()

    async def reader():
        reads = IdleReads()
        try:
            return await reads.next(source, 5.0)
        finally:
            reads.close()

    task = asyncio.ensure_future(reader())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_end_of_iteration_passes_through():
    source = Source()
    reads = IdleReads()
    source.queue.put_nowait(StopAsyncIteration)
    with pytest.raises(StopAsyncIteration):
        await reads.next(source, 1.0)
    reads.close()
    assert reads._deadline._timer is None  # closed: nothing holds the task

"""The report a hanging test prints (tests/hang_report.py): it must name the await that never
completes, which pytest-timeout's own stack (the event loop's select) does not."""

from __future__ import annotations

import asyncio

from tests.hang_report import HangReporter
from tests.waiting import wait_for


async def waits_for_ever(event: asyncio.Event) -> None:
    await event.wait()


async def test_the_report_names_the_stuck_task_and_its_coroutine(capsys):
    never = asyncio.Event()
    task = asyncio.create_task(waits_for_ever(never), name="stuck-one")
    try:
        with HangReporter("some/test.py::hangs", after_s=0.2) as reporter:
            # The loop stays free to run the report's callback. The report walks every object
            # of the process (its suspended coroutines), which late in a full run on a slow
            # machine takes longer than any fixed sleep: wait until it is written.
            await wait_for(reporter.written.is_set, "the report to be written")
    finally:
        task.cancel()
    err = capsys.readouterr().err
    assert "some/test.py::hangs still running after 0 s" in err
    assert "Thread" in err  # every thread's stack
    assert "stuck-one" in err and "in waits_for_ever" in err  # the task and where it waits
    assert "suspended coroutines of the project:" in err
    awaits_at = waits_for_ever.__code__.co_firstlineno + 1  # the line of its await
    assert f"tests/test_hang_report.py:{awaits_at} in waits_for_ever" in err


async def test_a_test_that_ends_in_time_prints_nothing(capsys):
    with HangReporter("some/test.py::quick", after_s=0.5):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.7)
    assert "still running" not in capsys.readouterr().err

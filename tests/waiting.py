"""Waiting in tests for something that happens asynchronously."""

from __future__ import annotations

import asyncio


async def wait_for(predicate, what: str, timeout_s: float = 60.0) -> None:
    """Wait for an asynchronous consequence; the timeout only bounds a broken run."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)

"""server.runtime.remote_scheduler.RemoteMetrics: a frontend's counts go to the engine process as
messages. The audio seconds are summed for AUDIO_SECONDS_PERIOD_S rather than sent once per turn
of the frontend's loop, and always before the end of an RPC is counted, so a scrape that sees a
call finished also sees its audio."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from server.runtime import remote_scheduler as rs
from server.runtime import wire as w

pytestmark = pytest.mark.asyncio


class _Link:
    def __init__(self):
        self.sent: list[w.Message] = []

    def _send(self, message: w.Message) -> None:
        self.sent.append(message)


async def test_audio_seconds_are_summed_over_a_period_and_precede_the_rpcs_end(monkeypatch):
    monkeypatch.setattr(rs, "AUDIO_SECONDS_PERIOD_S", 0.05)
    link = _Link()
    metrics = rs.RemoteMetrics(link)
    try:
        for _ in range(4):  # four turns of the loop, each with audio
            metrics.audio_seconds.inc(0.16)
            await asyncio.sleep(0)
        assert link.sent == []  # not one message per turn
        await asyncio.sleep(0.1)
        assert [type(m) for m in link.sent] == [w.AudioSeconds]
        assert link.sent[0].seconds == pytest.approx(0.64)
        metrics.audio_seconds.inc(0.5)
        metrics.rpc_finished("StreamingRecognize", "OK")  # the call's audio goes first
        assert [type(m) for m in link.sent[1:]] == [w.AudioSeconds, w.Rpc]
        assert link.sent[1].seconds == pytest.approx(0.5)
        await asyncio.sleep(0.1)
        assert len(link.sent) == 3  # the period's timer was cancelled: nothing sent twice
        metrics.audio_seconds.inc(0.25)
    finally:
        metrics.close()  # what is pending goes out on close
    assert type(link.sent[-1]) is w.AudioSeconds and link.sent[-1].seconds == pytest.approx(0.25)


async def test_a_frontends_written_chunk_latencies_go_to_the_engine_as_counts(monkeypatch):
    # The frontend's asr_chunk_written_seconds goes out every METRICS_FORWARD_PERIOD_S as bucket
    # counts (one message, however many responses), none while nothing was written, and what is
    # pending on close.
    monkeypatch.setattr(rs, "METRICS_FORWARD_PERIOD_S", 0.05)
    link = _Link()
    metrics = rs.RemoteMetrics(link)
    try:
        for v in (0.004, 0.03, 0.03, 0.7):
            metrics.chunk_written.observe(v)
        await asyncio.sleep(0.12)
        sent = [m for m in link.sent if type(m) is w.ChunksWritten]
        assert len(sent) == 1
        counts = np.frombuffer(sent[0].counts, dtype=np.int64)
        assert counts.sum() == 4 and sent[0].seconds == pytest.approx(0.764)
        edges = metrics.chunk_written._edges
        assert counts[np.searchsorted(edges, 0.03)] == 2  # bucketed as the engine's histogram buckets
        await asyncio.sleep(0.12)
        assert len([m for m in link.sent if type(m) is w.ChunksWritten]) == 1  # nothing new, nothing sent
        metrics.chunk_written.observe(0.05)
    finally:
        metrics.close()
    last = [m for m in link.sent if type(m) is w.ChunksWritten][-1]
    assert np.frombuffer(last.counts, dtype=np.int64).sum() == 1 and last.seconds == pytest.approx(0.05)

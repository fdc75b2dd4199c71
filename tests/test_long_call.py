"""A long call, shortened: four minutes of audio (utterances and pauses, endpointing on) sent as
fast as a real `asr-server` process (the fake engine via --engine-factory) takes it. Every
utterance gets its final while the stream is open; no response and no result grows with the
call (a whole-call transcript would be tens of times the largest bound here); the resident
memory of every server process stays put after the warm-up (a gross-leak guard: the
hour-long run in bench/RESULTS.md is the measurement)."""

from __future__ import annotations

import pytest

from bench.long_call import long_call_with_own_server, parse_args

pytestmark = pytest.mark.asyncio
MINUTES = 4.0
UTTERANCE_S, PAUSE_S = 4.0, 1.0


async def test_a_long_call_keeps_response_sizes_and_server_memory_flat():
    args = parse_args(["--minutes", str(MINUTES), "--utterance-s", str(UTTERANCE_S), "--pause-s", str(PAUSE_S),
                       "--sample-every-s", "30", "--stop-history-ms", "320"])
    report = await long_call_with_own_server(args, log=lambda *_: None)
    assert report.status == "OK" and report.server_exit_code == 0
    utterances = report.utterances_sent
    assert utterances >= MINUTES * 60 / (UTTERANCE_S + PAUSE_S)
    # Each utterance is closed by the endpointer in its pause (the fake engine's tokens in the
    # pause after it may make one more utterance, closed by the next pause or the end of audio).
    assert report.end_reasons.get("endpoint", 0) >= utterances
    # One utterance's final (words and tokens of ~4 s) is the largest thing a response carries.
    assert report.response_bytes_max < 4096 and report.transcript_chars_max < 400
    flat = report.flat(skip_fraction=0.25)
    assert flat["response_bytes_max_after"] <= 1.5 * flat["response_bytes_max_before"]
    processes = set(report.windows[-1].rss_mib)
    assert {"server", "engine"} <= processes  # the engine worker is measured too
    assert flat["rss_total_growth_mib"] < 10.0, flat
    assert len(report.windows) >= 6

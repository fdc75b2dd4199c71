"""bench/relay_bench.py against a real server: its wire-level frontends open streams on a real
engine host (asr-server --frontends 2, the fake engine in its worker), send audio in real time,
get every chunk answered and nothing refused, and the report measures the engine process."""

from __future__ import annotations

import argparse

import pytest

from bench import relay_bench


@pytest.mark.parametrize("audio_messages", [False, True], ids=["ring", "audio-messages"])
def test_relay_bench_drives_a_real_engine_host_and_measures_it(audio_messages):
    """Both ways audio reaches the engine process: written into its sample ring, or in Audio
    messages (a frontend that cannot map the ring)."""
    args = argparse.Namespace(streams=60, links=2, warm=1.5, seconds=2.5, max_batch=64, step_delay_s=0.005,
                              engine_factory="tests.fake_engine:build_fake_engine", server_args="", server_log=None,
                              tick_ms=1.0, tokens_per_chunk=6,  # the random-weight model's rate
                              audio_messages=audio_messages)
    row = relay_bench.run_once(args, None)
    assert row["failed"] == 0, row["first_failure"]
    assert row["audio"] == ("messages" if audio_messages else "ring"), row
    # Every stream's chunk answered each period (real time), within the measuring window's edges.
    assert 0.8 * row["expected_chunks_per_s"] <= row["chunks_per_s"] <= 1.2 * row["expected_chunks_per_s"], row
    assert row["engine_process_us_per_chunk"] > 0 and row["worker_cores"] > 0, row

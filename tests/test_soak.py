"""A short soak that fits CI: bench/soak.py against a real `asr-server` process running
builtin:tiny on CPU (the full run and its figures: bench/SOAK.md)."""

from __future__ import annotations

import pytest

from bench.soak import DEFAULT_SERVER_ARGS, parse_args, soak_with_own_server

# Resident memory may grow while the allocator and the engine reach their working size; a leak
# of even a few kilobytes per stream would pass this over the streams of the run.
RSS_GROWTH_LIMIT_MIB = 150


@pytest.mark.slow
async def test_short_soak_leaves_nothing_behind():
    args = parse_args(["--streams", "600", "--concurrency", "32", "--cancel-fraction", "0.3",
                       "--warmup-streams", "32", "--seed", "7", "--server-args", DEFAULT_SERVER_ARGS])
    report = await soak_with_own_server(args, log=lambda line: None)
    print(report.summary())
    assert report.streams == 600
    assert report.errors == 0, report.error_samples
    assert report.cancelled > 100 and report.completed > 300
    assert report.server_errors == {}, report.server_rpcs  # nothing but OK and CANCELLED went out
    assert report.active_streams_end == 0 and report.slots_in_use_end == 0
    assert report.health_end == "SERVING" and report.server_exit_code == 0
    # Every process of the server is measured: the engine worker holds the model and its caches.
    assert {"parent", "engine-worker"} <= set(report.rss_by_process_after), report.rss_by_process_after
    assert report.rss_by_process_after["engine-worker"] > report.rss_by_process_after["parent"]
    assert report.rss_growth_mib is not None and report.rss_growth_mib < RSS_GROWTH_LIMIT_MIB

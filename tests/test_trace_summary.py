"""bench/trace_summary.py: the device's busy and idle time read off a Chrome trace's timeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.trace_summary import device_events, summarize

ROOT = Path(__file__).resolve().parents[1]


def _trace() -> dict:
    # Two streams: k1 [0, 10), k2 [5, 20) overlapping it, a gap of 30, a copy [50, 60), a gap of
    # 15, k1 again [75, 100). Host operators and instant events are not device activity.
    return {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "k2", "ts": 5, "dur": 15},
        {"ph": "X", "cat": "kernel", "name": "k1", "ts": 0, "dur": 10},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 50, "dur": 10},
        {"ph": "X", "cat": "kernel", "name": "k1", "ts": 75, "dur": 25},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100},
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 30},
    ]}


def test_busy_idle_and_the_gaps_from_the_timeline():
    events = device_events(_trace())
    assert [e["name"] for e in events] == ["k1", "k2", "Memcpy DtoD", "k1"]
    text = summarize(events, steps=2, top=5, gaps=5)
    first = text.splitlines()[0]
    # span 100 us, busy 20 + 10 + 25 = 55 (the overlap counted once), idle 45 in 2 gaps; per step / 2
    assert first.startswith("span 0.050 ms a step, device busy 0.028 ms (55.0%), idle 0.022 ms in 2 gaps"), first
    lines = text.splitlines()
    gaps = lines[lines.index("largest gaps (us): after -> before") + 1:][:2]
    assert "30.0  k2 -> Memcpy DtoD" in gaps[0] and "15.0  Memcpy DtoD -> k1" in gaps[1], gaps
    totals = lines[lines.index("activities by total time, ms a step, calls a step:") + 1:]
    assert totals[0].split() == ["0.018", "1.0", "k1"], totals   # 35 us over 2 calls, per step of 2


def test_the_command_reads_a_trace_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_trace()))
    done = subprocess.run([sys.executable, "bench/trace_summary.py", str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("span 0.100 ms a step, device busy 0.055 ms (55.0%)"), done.stdout
    empty = tmp_path / "e.json"
    empty.write_text(json.dumps({"traceEvents": []}))
    done = subprocess.run([sys.executable, "bench/trace_summary.py", str(empty)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0 and "no device activity" in done.stdout

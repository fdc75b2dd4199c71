"""bench/pipeline_bench.py on the CPU: the worker's order of stages over a real engine (the next
step begun at QUEUED, before the current step's decode, and at DEVICE_DONE), two sets of streams
alternating, and the tokens of both orders compared. On the CPU there is no decode stream, so
this checks the script and the staging; the speed is for a GPU (bench/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pipeline_bench_runs_both_orders_and_finds_the_same_tokens(tmp_path):
    out = tmp_path / "pipeline.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "pipeline_bench.py"), "--model", "builtin:tiny",
                           "--device", "cpu", "--dtype", "float32", "--engine", "fast", "--batches", "3",
                           "--steps", "6", "--repeats", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["source_revision"]["commit"] and "dirty" in report["source_revision"], report
    (row,) = report["rows"]
    assert row["batch"] == 3 and row["same_tokens"] and row["tokens"] > 0, row
    assert row["decode stream"]["step_ms"] > 0 and row["one stream"]["step_ms"] > 0, row

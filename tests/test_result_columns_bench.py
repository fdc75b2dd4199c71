"""bench/result_columns_bench.py runs here: the engine's result columns over random labels at a
small batch, every row with its text, and a time per call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_result_columns_bench_times_a_batch():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "result_columns_bench.py"), "--json", "--batch", "8",
                           "--tokens", "3", "--iters", "20"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["batch"] == 8 and row["tokens_per_row"] == 3 and 0 < row["min_us"] <= row["median_us"], row
    assert row["source_revision"]["commit"] and "dirty" in row["source_revision"], row

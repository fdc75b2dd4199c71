"""bench/attention_bench.py on the CPU under Triton's interpreter: every launch of the attention
kernel (both products, one block and several) is checked against PyTorch's gather + bias + SDPA
before it is timed, and the best launch comes out in the form step_attention.parse_tuning reads.
The times mean nothing here (the interpreter); this checks the script the device call runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engines import step_attention

ROOT = Path(__file__).resolve().parent.parent


def test_attention_bench_checks_every_launch_and_writes_the_best(tmp_path):
    pytest.importorskip("triton", reason="Triton is not installed (PyTorch's CPU wheels do not bring it; "
                                         "`pip install -e .[dev]` does)")
    out, tune = tmp_path / "attention.json", tmp_path / "tuning.txt"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop(step_attention.TUNING_ENV, None)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "attention_bench.py"), "--device", "cpu",
                           "--dtype", "float32", "--d-model", "32", "--heads", "2", "--cache", "20", "--frames", "2,7",
                           "--batches", "3", "--block-n", "0,8", "--warps", "4", "--stages", "1",
                           "--fma-block-n", "8", "--fma-max-frames", "2", "--out", str(out), "--tuning-out", str(tune)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["source_revision"]["commit"] and "dirty" in report["source_revision"], report
    timed = [r for r in report["rows"] if "kernel_ms" in r]
    # 2 new frames: two dot launches and one fma; 7: the two dot launches (fma only up to 2 frames);
    # each in both launch orders
    assert sorted((r["frames"], r["block_n"], r["products"], r["order"]) for r in timed) == sorted(
        (T, bn, prod, order) for T, bn, prod in [(2, 0, "dot"), (2, 8, "dot"), (2, 8, "fma"), (7, 0, "dot"), (7, 8, "dot")]
        for order in ("rows", "heads")), report["rows"]
    assert not [r for r in report["rows"] if "error" in r], report["rows"]
    assert all(r["max_err"] < 1e-4 for r in timed), timed  # fp32 under the interpreter: PyTorch's result
    chosen = step_attention.parse_tuning(tune.read_text())
    assert set(chosen) == {"few", "many"} and chosen["many"].products == "dot"

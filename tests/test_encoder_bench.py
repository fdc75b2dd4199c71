"""bench/encoder_bench.py's CPU path (the lead runs the GPU path on an H100)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_encoder_bench_cpu_path(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "enc.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "encoder_bench.py"), "--device", "cpu", "--model", "builtin:tiny",
           "--batches", "1,2", "--lookaheads", "160", "--variants", "eager,cudagraph-nograph,onnx,tensorrt",
           "--streams", "2", "--stream-seconds", "0.8", "--target-seconds", "0.05", "--cache-dir", str(tmp_path),
           "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["meta"]["complete"] and not report["errors"], report["errors"]
    rows = {(r["variant"], r["batch"]) for r in report["results"]}
    assert rows == {(v, b) for v in ("eager", "cudagraph-nograph", "onnx") for b in (1, 2)}
    for r in report["results"]:
        assert r["ms"] > 0 and r["flops"] > 0 and r["tflops"] > 0
        if r["variant"] != "eager":
            assert r["max_rel"] < 1e-4 and r["lengths_equal"]
    for v in report["variants"]:
        assert v["agreement"]["token_agreement"] == 1.0
        if v["variant"] != "eager":
            assert v["selfcheck"]["passed"]
    assert [s["variant"] for s in report["skipped"]] == ["tensorrt"]
    assert "| 160 | onnx | 2 |" in result.stdout  # the markdown table

"""bench/summarize.py: the long-stream run and its churn variant side by side, server CPU cores per
1,000 streams, and the ratio to NeMo's pipeline stated with its dtypes. The asr-loadgen reports
are made up (the fields summarize reads), so the arithmetic is checked against known inputs; the
CPU smoke of bench/run_h100.sh runs it on real reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.summarize import summarize


def _level(c: int, p95: float, cores: float) -> dict:
    lat = {"p50": p95 / 2, "p95": p95}
    return {"concurrency": c, "streams_completed": c, "errors": {}, "chunk_latency_ms": lat,
            "server_metrics": {"frontend_streams": {"frontend-0": c - c // 3, "frontend-1": c // 3}},
            "response_latency_ms": lat, "final_latency_ms": lat, "throughput": {"rtfx": 0.9 * c},
            "passes_target": {"chunk": p95 <= 160, "response": p95 <= 160},
            "loadgen": {"bottleneck": False, "cpu_util": [0.1], "loop_lag_ms": {"p99": 1.0}},
            "server_process": {"cores": cores / 2, "main_thread_cores": 0.1, "cores_all_processes": cores,
                               "frontends": [{"pid": 1, "cores": 0.9, "main_thread_cores": 0.7},
                                             {"pid": 2, "cores": 0.4, "main_thread_cores": 0.25}]}}


def _report(stream_s: float, levels: list[dict], capacity: int) -> dict:
    server = {"engine": "fast-cudagraph", "name": "builtin:nemotron-0.6b", "max_batch": 256, "max_streams": 4608,
              "engine_executions": {"fast-cudagraph": 9}}
    return {"server": server, "server_after": server, "levels": levels,
            "settings": {"target_ms": 160.0, "stream_seconds": stream_s if stream_s > 6 else 0.0,
                         "audio": {"paths": [], "utterances": 0, "synthetic_seconds": min(stream_s, 6.0)}},
            "capacity": {"capacity": capacity, "metric": "chunk", "bracket": [capacity, capacity + 200],
                         "search_unfinished": False}}


@pytest.mark.parametrize("base_dtype", ["float16", "bfloat16"])
def test_long_run_churn_variant_cores_per_thousand_and_the_dtype_of_the_ratio(tmp_path: Path, base_dtype: str):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(), work.mkdir()
    (out / "loadgen_160.json").write_text(json.dumps(_report(60.0, [_level(2000, 120.0, 3.0),
                                                                   _level(2200, 190.0, 3.3)], 2000)))
    (work / "churn_160.json").write_text(json.dumps(_report(1.5, [_level(1, 15.0, 0.2), _level(2400, 150.0, 4.8)],
                                                              2400)))
    (work / "env.json").write_text(json.dumps({"settings": {"dtype": "float16"}}))
    (work / "base.jsonl").write_text(json.dumps({"batch": 256, "ctx": [70, 1], "files": 256, "audio_s": 2560.0,
                                                 "wall_s": 5.0, "rtfx": 512.0}) + "\n")
    s = summarize(str(out), str(work / "base.jsonl"), str(work / "env.json"), base_dtype, None, churn_dir=str(work))
    (main,), (churn,) = s["ours"], s["churn"]
    assert main["stream_s"] == 60.0 and churn["stream_s"] == 1.5
    assert [r["srv_cores_per_1k"] for r in main["levels"]] == [1.5, 1.5]
    assert main["server_cores_per_1k_streams_at_capacity"] == 1.5
    assert churn["server_cores_per_1k_streams_at_capacity"] == 2.0
    # c=1 comes from the churn variant when the long run has no level 1, and says so.
    c1 = [t for t in s["targets"] if "c=1 chunk" in t["what"]]
    assert len(c1) == 1 and "churn variant" in c1[0]["what"] and c1[0]["value"] == "7.5"
    ratios = {r["variant"]: r for r in s["ratios"] if "variant" in r}
    assert ratios["main"]["ratio"] == round(2000 / 512, 3) and ratios["churn variant"]["ratio"] == round(2400 / 512, 3)
    same = base_dtype == "float16"
    assert ("both float16" in ratios["main"]["what"]) == same
    assert ("NOT the same dtype" in ratios["main"]["what"]) == (not same)
    md = (out / "summary.md").read_text()
    assert "churn, 160 ms lookahead: levels, streams of 1.5 s" in md and "(churn variant, streams of 1.5 s)" in md
    assert "## Churn variant" in md and "server CPU cores per 1,000 streams at capacity" in md
    assert "[busiest / least busy frontend loop; streams per frontend]" in md
    assert "(0.10) [0.70 / 0.25; streams 1334 / 666]" in md  # the frontends' spread, in CPU and in streams
    assert "streams of 60 s at p95 chunk latency <= 160 ms over NeMo's offline RTFx at batch 256" in md
    assert f"dtype: NeMo's pipeline {base_dtype} (BASE_DTYPE), our server float16" in md
    assert json.loads((out / "summary.json").read_text())["server_cpu_per_1k_streams"][0]["cores_per_1k_streams"] == 1.5

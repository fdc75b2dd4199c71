"""Host-side (CPU, Python) cost of serving one chunk, measured without a GPU (issue 4).

Two parts, each a ceiling on how many streams one server process can carry whatever the GPU:

  engine  StreamingEngine steps of builtin:tiny on the CPU at several batch sizes, split by phase
          (engine.step's StepTimings). assemble, commit and results are per-row host work; the
          features/gather/encoder/decode phases are model compute here (on a GPU they are kernel
          launches and device waits).
  serve   a real asr-server (server.service.cli, grpc.aio on loopback) on an engine whose compute is
          trivial (tests.fake_engine), pinned to one core, driven by asr-loadgen (pinned to the
          other core) at rising real-time concurrency. Per level: chunks/s the server answered,
          its CPU (whole process, event-loop thread, engine thread) and CPU microseconds per
          chunk; 1e6 / (us per chunk) is the most chunks/s one core of this server path carries.

  python bench/host_overhead.py --part engine --batches 1,16,64,256
  python bench/host_overhead.py --part serve --levels 100,200,400 --seconds 6
  python bench/host_overhead.py --part serve --no-realtime --levels 64   # as fast as it goes

Timings on a shared, noisy machine: compare ratios within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from engines.api import STEP_PHASES

# the step's phases one by one (engines.api.StepTimings.phases: features without the assemble and
# gather it includes as a field), then the whole step
PHASES = (*(f"{p}_ms" for p in STEP_PHASES), "total_ms")


def _phase_ms(t, name: str) -> float:
    return t.total_ms if name == "total_ms" else t.phases()[name[:-3]]


# -- part 1: the engine step's phases ---------------------------------------------------------------
def bench_engine(batches: list[int], iters: int, warm: int, lookahead_ms: int) -> list[dict]:
    import numpy as np  # noqa: F401 - the engine part alone loads torch
    import torch

    from engines.api import ChunkWork, StepPlan
    from engines.config import EngineConfig
    from engines.factory import build_engine
    from engines.models import speechlike_audio

    torch.set_num_threads(1)  # one core: the host cost of one engine thread
    cap = max(batches)
    engine = build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                                       lookahead_ms=lookahead_ms, max_streams=cap, max_batch=cap))
    g = engine.geometry
    audio = speechlike_audio(g.samples_needed(warm + iters + 2) / g.sample_rate + 1, seed=1)
    rows = []
    for batch in batches:
        slots = [engine.acquire_slot() for _ in range(batch)]
        timings = []
        try:
            for k in range(warm + iters):
                a, b = g.chunk_span(k, len(audio), False)
                plan = StepPlan(tuple(ChunkWork(f"s{i}", s, audio[a:b], k == 0, False) for i, s in enumerate(slots)))
                result = engine.step(plan)
                if k >= warm:
                    timings.append(result.timings)
        finally:
            for s in slots:
                engine.release_slot(s)
        row = {"batch": batch}
        for name in PHASES:
            row[name] = round(statistics.median(_phase_ms(t, name) for t in timings), 3)
        host = row["assemble_ms"] + row["commit_ms"] + row["results_ms"]
        row["host_rows_ms"] = round(host, 3)
        row["host_us_per_row"] = round(1e3 * host / batch, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def engine_table(rows: list[dict]) -> str:
    head = "| batch | " + " | ".join(p[:-3] for p in PHASES) + " | per-row host ms | host us/row |"
    lines = [head, "|" + "---|" * (len(PHASES) + 3)]
    for r in rows:
        lines.append(f"| {r['batch']} | " + " | ".join(f"{r[p]:.2f}" for p in PHASES)
                     + f" | {r['host_rows_ms']:.2f} | {r['host_us_per_row']:.1f} |")
    return "\n".join(lines)


# -- part 2: the serving path on a trivial engine ----------------------------------------------------
def _pinned(core: int | None) -> list[str]:
    if core is None or shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        return []
    return ["taskset", "-c", str(core)]


def start_server(args, log_path: str) -> tuple[subprocess.Popen, int, int]:
    cmd = [*_pinned(0), sys.executable, "-m", "server.service.cli", "--engine-factory", "tests.fake_engine:build_fake_engine",
           "--max-streams", str(args.max_streams), "--max-batch", str(args.max_batch),
           "--lookahead-ms", str(args.lookahead_ms), "--batch-wait-ms", str(args.batch_wait_ms),
           "--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
           "--log-level", "WARNING", "--idle-timeout-s", "60", *args.server_args]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = open(log_path).read()
        m = re.search(r"listening on [^ ]*:(\d+) .*metrics on http://[^ ]*:(\d+)/metrics", text)
        if m:
            return proc, int(m.group(1)), int(m.group(2))
        if proc.poll() is not None:
            raise RuntimeError(f"server exited during start-up:\n{text}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start in 120 s")


def bench_serve(args) -> list[dict]:
    work = tempfile.mkdtemp(prefix="host-overhead-")
    proc, port, mport = start_server(args, os.path.join(work, "server.log"))
    out = os.path.join(work, "loadgen.json")
    try:
        cmd = [*_pinned(1), sys.executable, "-m", "client.loadgen", "--server", f"127.0.0.1:{port}",
               "--metrics-url", f"http://127.0.0.1:{mport}/metrics", "--server-pid", str(proc.pid),
               "--concurrency", args.levels, "--synthetic-clips", "4", "--synthetic-seconds", str(args.seconds),
               "--ramp-s", str(args.ramp_s), "--cooldown-s", "1", "--level-grace-s", "30", "--json", out, "--quiet"]
        if not args.realtime:
            cmd.append("--no-realtime")
        print("#", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        report = json.load(open(out))
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    rows = []
    for lv in report["levels"]:
        sm, sp = lv.get("server_metrics") or {}, lv.get("server_process") or {}
        chunks_s = (sm.get("steps_per_s") or 0.0) * (sm.get("mean_batch") or 0.0)
        threads = sp.get("busiest_threads") or []
        others = [t["cores"] for t in threads if not t["main"]]
        cores = sp.get("cores") or 0.0
        row = {"concurrency": lv["concurrency"], "errors": sum(lv["errors"].values()),
               "chunks_per_s": round(chunks_s, 1), "mean_batch": sm.get("mean_batch"),
               "steps_per_s": sm.get("steps_per_s"),
               "chunk_p50_ms": lv["chunk_latency_ms"].get("p50"), "chunk_p95_ms": lv["chunk_latency_ms"].get("p95"),
               "server_cores": cores, "loop_cores": sp.get("main_thread_cores"),
               "engine_thread_cores": max(others) if others else None,
               "loadgen_cpu": max(lv["loadgen"]["cpu_util"]) if lv["loadgen"].get("cpu_util") else None,
               "loadgen_bound": bool(lv["loadgen"].get("bottleneck"))}
        row["server_us_per_chunk"] = round(1e6 * cores / chunks_s, 1) if chunks_s else None
        row["loop_us_per_chunk"] = round(1e6 * (row["loop_cores"] or 0) / chunks_s, 1) if chunks_s else None
        row["one_core_chunks_per_s"] = round(1e6 / row["server_us_per_chunk"]) if row["server_us_per_chunk"] else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def serve_table(rows: list[dict]) -> str:
    lines = ["| streams | chunks/s | mean batch | chunk p50 / p95 ms | server cores (loop, engine thread) | "
             "server us/chunk (loop) | one-core ceiling chunks/s | loadgen CPU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['chunks_per_s']:.0f} | {r['mean_batch']} | "
                     f"{r['chunk_p50_ms']} / {r['chunk_p95_ms']} | {r['server_cores']} ({r['loop_cores']}, "
                     f"{r['engine_thread_cores']}) | {r['server_us_per_chunk']} ({r['loop_us_per_chunk']}) | "
                     f"{r['one_core_chunks_per_s']} | {r['loadgen_cpu']}{' LG-bound' if r['loadgen_bound'] else ''} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("engine", "serve", "both"), default="both")
    ap.add_argument("--lookahead-ms", type=int, default=160)
    ap.add_argument("--batches", default="1,16,64,256", help="engine part: batch sizes")
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--levels", default="50,100,200,400", help="serve part: concurrent real-time streams")
    ap.add_argument("--seconds", type=float, default=6.0, help="serve part: audio per stream")
    ap.add_argument("--ramp-s", type=float, default=2.0)
    ap.add_argument("--no-realtime", dest="realtime", action="store_false")
    ap.add_argument("--max-streams", type=int, default=2048)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="more asr-server flags (last)")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args()
    report: dict = {"argv": sys.argv[1:], "cpus": os.cpu_count()}
    if args.part in ("engine", "both"):
        report["engine"] = bench_engine([int(b) for b in args.batches.split(",")], args.iters, args.warm,
                                        args.lookahead_ms)
    if args.part in ("serve", "both"):
        report["serve"] = bench_serve(args)
    print()
    if "engine" in report:
        print(f"engine step, builtin:tiny eager on CPU (1 thread), {args.lookahead_ms} ms lookahead; median ms\n")
        print(engine_table(report["engine"]) + "\n")
    if "serve" in report:
        mode = "real-time" if args.realtime else "as fast as possible"
        print(f"serving path: asr-server on the fake engine, {mode} streams, {args.lookahead_ms} ms chunks\n")
        print(serve_table(report["serve"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

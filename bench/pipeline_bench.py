"""Steps per second of the engine run the way the engine worker runs it, with the decode on a CUDA
stream of its own against one stream, on one engine, alternating.

The worker keeps two steps in flight, each stream in one of them, and begins the next step's
device work behind the current one's (server/runtime/engine_worker.py `_finish`). With one stream
it can do so only once the current step has decoded and committed (DEVICE_DONE): the decode loop
waits for the device every few iterations and the host then reads the results back, so the device
idles between one step's decode and the next step's features. With a decode stream
(StreamingEngine.decode_stream) the next step is begun as soon as the current step's encoder is
queued (QUEUED), and its features, gather and encoder run while the current step decodes.

Here the next step is always at hand (as when the scheduler has sent it in time), so the figure is
what the engine process can carry when the link and the scheduler keep up: steps per second and
rows per second at each batch, per mode. Both modes start the same streams on the same audio, and
their tokens must be equal (checked; a mismatch fails the run).

    python bench/pipeline_bench.py --model builtin:nemotron-0.6b --device cuda --dtype float16 \\
        --engine fast-cudagraph --lookahead 160 --batches 256,512 --steps 40 --repeats 2 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.provenance import describe, source_revision  # noqa: E402
from engines.api import DEVICE_DONE, QUEUED, StepPlan  # noqa: E402
from engines.config import EngineConfig  # noqa: E402
from engines.factory import build_engine  # noqa: E402
from engines.models import speechlike_audio  # noqa: E402
from engines.sample_ring import RingSamples, SampleRing  # noqa: E402


def run_pipelined(engine, plans: list[StepPlan]) -> tuple[float, float, list]:
    """The plans, two in flight as the worker runs them; (seconds, this thread's CPU seconds, each
    step's tokens per row). The CPU seconds are the host work a worker thread does for these
    steps. On CUDA they include the waits for the device, which the runtime spends spinning by
    default: well under the seconds, they show the host has room; equal, they show nothing."""
    early = engine.next_at == QUEUED
    out = []
    engine.synchronize()
    t0, c0 = time.perf_counter(), time.thread_time()
    current = engine.start_step(plans[0])
    current.advance()
    for i in range(len(plans)):
        nxt = None
        prepared = engine.prepare(plans[i + 1]) if i + 1 < len(plans) else None  # read ahead
        if early and prepared is not None:
            nxt = engine.start_step(prepared)
            nxt.advance()
        current.advance()  # decode and commit queued
        if nxt is None and prepared is not None:
            nxt = engine.start_step(prepared)
            nxt.advance()
        while current.advance():
            pass
        out.append([u.tokens for u in current.result.updates])
        current = nxt
    engine.synchronize()
    return time.perf_counter() - t0, time.thread_time() - c0, out


def clips_for(engine, batch: int, steps: int) -> list[np.ndarray]:
    """Audio for two sets of `batch` streams, each long enough for its half of `steps`."""
    g = engine.geometry
    n = g.samples_needed(steps // 2 + 2)
    base = [speechlike_audio(n / g.sample_rate + 0.1, seed=9000 + i)[:n] for i in range(16)]
    return [np.roll(base[i % 16], 1601 * (i // 16)) for i in range(2 * batch)]  # distinct, cheaply


def plans_for(engine, clips: list[np.ndarray], steps: int) -> tuple[list[StepPlan], list[int]]:
    """`steps` plans over two sets of fresh streams (the clips' halves), alternating (a stream in
    every other step, as the scheduler's two steps in flight hold different streams). Each row's
    audio is a span of a sample ring holding the whole clip, as the engine worker's steps name
    spans of the ring the frontends write (engines.sample_ring), so the host work is the
    worker's."""
    g = engine.geometry
    batch, n = len(clips) // 2, len(clips[0])
    slots = [engine.acquire_slot() for _ in clips]
    ring = SampleRing.local(engine.capacity, n)
    for slot, clip in zip(slots, clips):
        ring.write(slot, 0, clip)
    plans = []
    for i in range(steps):
        k, rows = i // 2, list(range(0, batch) if i % 2 == 0 else range(batch, 2 * batch))
        start, end = g.chunk_span(k, n, False)
        row_slots = np.array([slots[r] for r in rows], dtype=np.int64)
        samples = RingSamples(ring, row_slots, np.full(batch, start), np.full(batch, end))
        flags = np.zeros(batch, dtype=bool)
        plans.append(StepPlan.from_columns([f"s{r}" for r in rows], row_slots, samples, flags | (k == 0), flags, flags))
    return plans, slots


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:nemotron-0.6b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--engine", default="fast-cudagraph")
    ap.add_argument("--lookahead", type=int, default=160)
    ap.add_argument("--batches", default="256,512")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per batch and mode (after 4 untimed)")
    ap.add_argument("--repeats", type=int, default=2, help="alternations of the two modes per batch")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cfg = EngineConfig(model=args.model, engine=args.engine, device=args.device, dtype=args.dtype,
                       lookahead_ms=args.lookahead, max_streams=2 * max(batches), max_batch=max(batches), decode_stream=True)
    revision = source_revision()  # before the run: the source that runs
    print(f"# source: {describe(revision)}", flush=True)
    t0 = time.perf_counter()
    engine = build_engine(cfg)
    engine.warmup()
    print(f"# {args.model} {engine.dtype} on {engine.device}, encoder engine {engine.encoder_engine.name}, "
          f"ready in {time.perf_counter() - t0:.1f} s; decode stream: {engine.decode_stream is not None}", flush=True)
    stream, stream_next_at = engine.decode_stream, engine.next_at  # restored after each batch
    if stream is None:  # the CPU: the order of the stages alone (checks this script and the staging)
        print("# no decode stream on this device (CUDA only): both modes run on one stream, the "
              "next step begun at QUEUED or at DEVICE_DONE", flush=True)
    chunk_s = engine.geometry.chunk_samples / engine.geometry.sample_rate
    modes = {"decode stream": (stream, QUEUED), "one stream": (None, DEVICE_DONE)}
    rows_out = []
    for batch in batches:
        seconds: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        tokens: dict[str, list] = {}
        clips = clips_for(engine, batch, args.steps + 4)
        for _ in range(args.repeats):
            for mode, (decode_stream, next_at) in modes.items():
                engine.decode_stream, engine.next_at = decode_stream, next_at
                plans, slots = plans_for(engine, clips, args.steps + 4)
                try:
                    run_pipelined(engine, plans[:4])  # first chunks, caches filled
                    took, used, out = run_pipelined(engine, plans[4:])
                finally:
                    for slot in slots:
                        engine.release_slot(slot)
                seconds[mode].append(took / args.steps)
                cpu[mode].append(used / args.steps)
                tokens.setdefault(mode, out)
        engine.decode_stream, engine.next_at = stream, stream_next_at
        same = tokens["decode stream"] == tokens["one stream"]
        decoded = sum(len(t) for step in tokens["one stream"] for t in step)
        row = {"batch": batch, "same_tokens": same, "tokens": decoded}
        for mode in modes:
            ms = 1e3 * min(seconds[mode])
            best = seconds[mode].index(min(seconds[mode]))
            row[mode] = {"step_ms": round(ms, 3), "step_ms_all": [round(1e3 * s, 3) for s in seconds[mode]],
                         "host_cpu_ms": round(1e3 * cpu[mode][best], 3),
                         "rows_per_s": round(batch / ms * 1e3, 1),
                         "realtime_streams": round(batch / ms * 1e3 * chunk_s, 0)}
        row["speedup"] = round(row["one stream"]["step_ms"] / row["decode stream"]["step_ms"], 3)
        rows_out.append(row)
        print(json.dumps(row), flush=True)
        if not same:
            print(f"batch {batch}: the two modes decoded different tokens", file=sys.stderr)
    print("\n| batch | one stream ms/step | decode stream ms/step | speedup | host CPU ms/step (decode stream) | "
          "rows/s (decode stream) | real-time streams at this step rate | tokens equal |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['batch']} | {r['one stream']['step_ms']:.2f} | {r['decode stream']['step_ms']:.2f} | "
              f"{r['speedup']:.2f}x | {r['decode stream']['host_cpu_ms']:.2f} | {r['decode stream']['rows_per_s']:.0f} | "
              f"{r['decode stream']['realtime_streams']:.0f} | {r['same_tokens']} ({r['tokens']} tokens) |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "source_revision": revision, "machine": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "model": args.model, "engine": engine.encoder_engine.name,
            "dtype": str(engine.dtype), "lookahead_ms": args.lookahead, "steps": args.steps, "repeats": args.repeats,
            "rows": rows_out}, indent=1))
    return 0 if all(r["same_tokens"] for r in rows_out) else 1


if __name__ == "__main__":
    sys.exit(main())

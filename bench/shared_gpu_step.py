"""Do engine processes that share one GPU get in each other's way?

Each of K processes builds its own StreamingEngine (its own CUDA context, as `asr-server
--engines K` runs them), warms it, waits for the others, then steps a steady-state batch
back to back for --seconds (optionally beside a pure-Python thread that competes for the
interpreter lock, as an event loop does: --gil-loads). Reported per K: the median and p95 step time of each process and
the chunks per second of all of them together. K=1 is the reference: if K=2 holds the step
time near K=1's, the GPU has room for a second engine process, and what a second process buys
is a second interpreter lock for the host work that limits one process.

  python bench/shared_gpu_step.py --model builtin:nemotron-0.6b --engine fast-cudagraph \
      --dtype float16 --lookahead 160 --batches 64,128 --processes 1,2 --seconds 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time


def _hold_the_lock(duty: float, stop: threading.Event, period_s: float = 0.002) -> None:
    """A stand-in for an event loop in the engine's process: pure Python bytecode (which holds
    the interpreter lock, handing it over only at the switch interval) for `duty` of each
    period, then a sleep."""
    while not stop.is_set():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < duty * period_s:
            sum(i * i for i in range(50))
        time.sleep((1 - duty) * period_s)


def _worker(args: argparse.Namespace, batches: list[int], loads: list[float], barrier, results) -> None:
    import torch

    from engines.api import ChunkWork, StepPlan
    from engines.config import EngineConfig
    from engines.factory import make_encoder_engine, resolve_device, resolve_dtype
    from engines.models import load_model, speechlike_audio
    from engines.streaming_engine import StreamingEngine

    dev = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, dev)
    model = load_model(args.model, args.lookahead)
    nemo = model.nemo_model.to(device=dev, dtype=dtype if dtype != torch.float32 else None)
    nemo.preprocessor.to(dtype=torch.float32)
    nemo.eval()
    top = max(batches)
    cfg = EngineConfig(model=args.model, engine=args.engine, lookahead_ms=args.lookahead,
                       max_streams=top, max_batch=top)
    engine = StreamingEngine(model, make_encoder_engine(args.engine, model, cfg, dev, dtype), args.lookahead,
                             capacity=top, max_batch=top, device=dev, dtype=dtype)
    engine.warmup()
    g = engine.geometry
    audio = speechlike_audio(60.0, seed=1)
    total = g.total_chunks(len(audio))
    sys.setswitchinterval(args.switch_ms / 1e3)
    for batch, load in [(b, x) for b in batches for x in loads]:
        slots = [engine.acquire_slot() for _ in range(batch)]
        # Wrap before the last chunk: streams stay open, caches stay full.
        plans = []
        for k in range(total - 1):
            a, b = g.chunk_span(k, len(audio), False)
            plans.append(StepPlan(tuple(ChunkWork(f"s{i}", s, audio[a:b], k == 0, False)
                                        for i, s in enumerate(slots))))
        for k in range(8):  # warm-up, and caches past their first chunks
            engine.step(plans[k])
        barrier.wait()
        stop = threading.Event()
        if load > 0:
            threading.Thread(target=_hold_the_lock, args=(load, stop), daemon=True).start()
        times = []
        k = 8
        end = time.perf_counter() + args.seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            engine.step(plans[1 + (k - 1) % (len(plans) - 1)])  # never chunk 0 again: no fresh rows
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(1e3 * (time.perf_counter() - t0))
            k += 1
        stop.set()
        times.sort()
        results.put({"batch": batch, "gil_load": load, "steps": len(times), "median_ms": statistics.median(times),
                     "p95_ms": times[int(0.95 * (len(times) - 1))], "seconds": args.seconds})
        for s in slots:
            engine.release_slot(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:nemotron-0.6b")
    ap.add_argument("--engine", default="fast-cudagraph")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--lookahead", type=int, default=160)
    ap.add_argument("--batches", default="64,128")
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--gil-loads", default="0",
                    help="duty cycles of a pure-Python thread beside the engine's (0: none), e.g. 0,0.45,0.9")
    ap.add_argument("--switch-ms", type=float, default=0.5, help="sys.setswitchinterval in each process")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    ctx = mp.get_context("spawn")  # a CUDA context per process, as the server's engine processes
    batches = [int(b) for b in args.batches.split(",")]
    loads = [float(x) for x in args.gil_loads.split(",")]
    rows = []
    for k in [int(p) for p in args.processes.split(",")]:
        barrier, results = ctx.Barrier(k), ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(args, batches, loads, barrier, results)) for _ in range(k)]
        for p in procs:
            p.start()
        for batch, load in [(b, x) for b in batches for x in loads]:
            outs = [results.get() for _ in procs]
            row = {"batch": batch, "processes": k, "gil_load": load,
                   "step_median_ms": [round(o["median_ms"], 2) for o in outs],
                   "step_p95_ms": [round(o["p95_ms"], 2) for o in outs],
                   "chunks_per_s": round(sum(o["steps"] * batch / o["seconds"] for o in outs), 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        for p in procs:
            p.join()
    rows.sort(key=lambda r: (r["batch"], r["processes"], r["gil_load"]))
    print("\n| batch | processes | Python thread duty | step median ms (each) | step p95 ms (each) | chunks/s, all |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['processes']} | {r['gil_load']:g} | {', '.join(map(str, r['step_median_ms']))} | "
              f"{', '.join(map(str, r['step_p95_ms']))} | {r['chunks_per_s']:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
